//! The profiling grid of `djinn calibrate profile`: a plan of step shapes that covers what
//! workloads produce within a time budget (`plan`, pure), and its run on an engine, CPU or CUDA,
//! recorded as the step and swap records of real runs (`run`).

pub mod plan;
pub mod run;

pub use plan::{plan_grid, GridLimits, GridPlan, GridShape, StepSpec};
pub use run::{run_grid, GridError, GridRecords};
