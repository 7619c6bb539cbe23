//! The GPU swap checks (engine::probe::swap::check): run for real where a GPU exists, skipped
//! with the reason printed where none does (CI). `djinn engine swap-check` runs the same checks.

#[cfg(feature = "cuda")]
#[test]
fn gpu_swap_checks() {
    let device = match engine::probe::swap::check::open_gpu() {
        Ok(device) => device,
        Err(why) => {
            println!("skipping the GPU swap checks: {why}");
            return;
        }
    };
    let outcomes = engine::probe::swap::check::run_all(device).expect("the swap checks ran");
    for o in &outcomes {
        println!(
            "{} {} ({})",
            if o.passed { "PASS" } else { "FAIL" },
            o.name,
            o.detail
        );
    }
    assert!(
        outcomes.iter().all(|o| o.passed),
        "some GPU swap checks failed"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_swap_checks() {
    println!("skipping the GPU swap checks: built without the `cuda` feature");
}
