//! The GEMM configuration table (`engine/data/gemm_configs.tsv`, written by `djinn engine
//! gemm-search`): GPU name, cuBLASLt version, shape -> the searched configuration, one line each.

use cudarc::cublaslt::sys as lsys;

use super::{AlgoConfig, GemmArgs, GemmOut, Plan, TunedGemm, ROW_BUCKET};
use crate::cuda::CudaError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TableChoice {
    /// `cublasGemmEx` (it won the hot timing).
    GemmEx,
    Lt(AlgoConfig),
}

/// One line of the GEMM configuration table.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TableEntry {
    pub gpu: String,
    pub lt_version: usize,
    pub bf16: bool,
    /// Row bucket (m rounded up to `ROW_BUCKET`).
    pub m_bucket: usize,
    pub n: usize,
    pub k: usize,
    pub out: GemmOut,
    pub choice: TableChoice,
    /// Hot ms per call measured by the search (documentation; not used for the choice).
    pub hot_ms: f64,
}

/// The table shipped in the repository (written by `djinn engine gemm-search`).
const SHIPPED_TABLE: &str = include_str!("../../../data/gemm_configs.tsv");
/// Column names of the table, in order.
pub const TABLE_HEADER: &str =
    "gpu\tcublaslt\tdtype\tm_bucket\tn\tk\tout\tchoice\talgo\ttile\tstages\tsplitk\treduction\tswizzle\tcustom\tinner\tcluster\thot_ms";

impl GemmOut {
    fn table_name(self) -> &'static str {
        match self {
            GemmOut::Half => "half",
            GemmOut::F32 => "f32",
            GemmOut::AddF32 => "add_f32",
            GemmOut::AddHalf => "add_half",
        }
    }
    fn from_table_name(s: &str) -> Option<GemmOut> {
        match s {
            "half" => Some(GemmOut::Half),
            "f32" => Some(GemmOut::F32),
            "add_f32" => Some(GemmOut::AddF32),
            "add_half" => Some(GemmOut::AddHalf),
            _ => None,
        }
    }
}

impl TableEntry {
    pub(crate) fn to_line(&self) -> String {
        let (choice, cfg) = match self.choice {
            TableChoice::GemmEx => ("gemm_ex", [0u32; 9]),
            TableChoice::Lt(c) => ("lt", c.0),
        };
        let cfg: Vec<String> = cfg.iter().map(|v| v.to_string()).collect();
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.4}",
            self.gpu,
            self.lt_version,
            if self.bf16 { "bf16" } else { "f16" },
            self.m_bucket,
            self.n,
            self.k,
            self.out.table_name(),
            choice,
            cfg.join("\t"),
            self.hot_ms
        )
    }

    fn parse_line(line: &str) -> Result<TableEntry, String> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 18 {
            return Err(format!("{} tab-separated fields, expected 18", f.len()));
        }
        let num = |i: usize| -> Result<usize, String> {
            f[i].trim()
                .parse::<usize>()
                .map_err(|_| format!("field {} `{}` is not a number", i + 1, f[i]))
        };
        let bf16 = match f[2] {
            "f16" => false,
            "bf16" => true,
            other => return Err(format!("dtype `{other}`: expected f16 or bf16")),
        };
        let out = GemmOut::from_table_name(f[6])
            .ok_or_else(|| format!("out `{}`: expected half, f32 or add_f32", f[6]))?;
        let mut cfg = [0u32; 9];
        for (j, c) in cfg.iter_mut().enumerate() {
            *c = u32::try_from(num(8 + j)?).map_err(|_| format!("field {} too large", 9 + j))?;
        }
        let choice = match f[7] {
            "gemm_ex" => TableChoice::GemmEx,
            "lt" => TableChoice::Lt(AlgoConfig(cfg)),
            other => return Err(format!("choice `{other}`: expected gemm_ex or lt")),
        };
        let hot_ms = f[17]
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("hot_ms `{}` is not a number", f[17]))?;
        Ok(TableEntry {
            gpu: f[0].to_string(),
            lt_version: num(1)?,
            bf16,
            m_bucket: num(3)?,
            n: num(4)?,
            k: num(5)?,
            out,
            choice,
            hot_ms,
        })
    }
}

/// Parses a table (`#` comment lines, a header line starting with `gpu`, one entry per line).
pub(crate) fn parse_table(text: &str) -> Result<Vec<TableEntry>, String> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') || line.starts_with("gpu\t") {
            continue;
        }
        entries.push(TableEntry::parse_line(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(entries)
}

/// The entries of the table at `path` (`None`: the built-in one) for this GPU and cuBLASLt
/// version, and a line saying what was found. A table that cannot be read or parsed is an error.
pub(super) fn load(
    path: Option<&std::path::Path>,
    gpu: &str,
    lt_version: usize,
) -> Result<(Vec<TableEntry>, String), CudaError> {
    let (source, text) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| CudaError::Io {
                path: path.to_path_buf(),
                message: format!("reading the GEMM configuration table: {e}"),
            })?;
            (path.display().to_string(), text)
        }
        None => (
            "engine/data/gemm_configs.tsv (built in)".to_string(),
            SHIPPED_TABLE.to_string(),
        ),
    };
    let all = parse_table(&text)
        .map_err(|e| CudaError::BadInput(format!("GEMM configuration table {source}: {e}")))?;
    let for_gpu: Vec<TableEntry> = all.into_iter().filter(|e| e.gpu == gpu).collect();
    let (usable, other_version): (Vec<TableEntry>, Vec<TableEntry>) = for_gpu
        .into_iter()
        .partition(|e| e.lt_version == lt_version);
    let line = if !usable.is_empty() {
        format!(
            "GEMM table {source}: {} searched configurations for {gpu}, cuBLASLt {lt_version}",
            usable.len()
        )
    } else if !other_version.is_empty() {
        format!(
            "GEMM table {source}: its {} entries for {gpu} were searched with cuBLASLt {} but this is {lt_version}: every prefill GEMM shape falls back to the timed heuristic choice",
            other_version.len(),
            other_version[0].lt_version
        )
    } else {
        format!(
            "GEMM table {source}: no entries for {gpu}: every prefill GEMM shape falls back to the timed heuristic choice"
        )
    };
    Ok((usable, line))
}

impl TunedGemm {
    /// The table's choice for `a`'s row bucket, verified on this machine: `Ok(Some(algo))` for a
    /// cuBLASLt configuration that passes `AlgoCheck`, `Ok(None)` for `cublasGemmEx`, `Err(why)`
    /// when there is no usable entry.
    pub(super) fn table_choice(
        &self,
        a: &GemmArgs,
        plan: &Plan,
    ) -> Result<Option<lsys::cublasLtMatmulAlgo_t>, String> {
        let bucket = a.m.div_ceil(ROW_BUCKET) * ROW_BUCKET;
        let entry = self
            .table
            .iter()
            .find(|e| {
                e.bf16 == a.bf16
                    && e.m_bucket == bucket
                    && e.n == a.n
                    && e.k == a.k
                    && e.out == a.out
            })
            .ok_or_else(|| format!("no table entry for {} rows (bucket {bucket})", a.m))?;
        match entry.choice {
            TableChoice::GemmEx => Ok(None),
            TableChoice::Lt(cfg) => {
                let algo = self.build_algo(a, &cfg).ok_or_else(|| {
                    format!("this cuBLASLt rejects the table's configuration ({cfg})")
                })?;
                self.check(plan, &algo, a).ok_or_else(|| {
                    format!("the table's configuration ({cfg}) fails cublasLtMatmulAlgoCheck here")
                })?;
                Ok(Some(algo))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_lines_round_trip() {
        let entries = parse_table(SHIPPED_TABLE).expect("the shipped table parses");
        assert!(!entries.is_empty(), "the shipped table has entries");
        for e in &entries {
            let again = TableEntry::parse_line(&e.to_line()).expect("a written line parses");
            assert_eq!(again.choice, e.choice);
            assert_eq!(
                (
                    again.m_bucket,
                    again.n,
                    again.k,
                    again.out,
                    again.bf16,
                    again.lt_version
                ),
                (e.m_bucket, e.n, e.k, e.out, e.bf16, e.lt_version)
            );
            assert_eq!(again.gpu, e.gpu);
        }
    }

    #[test]
    fn bad_table_lines_are_errors_naming_the_line() {
        let header = format!("# comment\n{TABLE_HEADER}\n");
        let short = format!("{header}NVIDIA X\t130100\tf16\t2048\n");
        assert!(parse_table(&short).unwrap_err().starts_with("line 3:"));
        let bad_choice = format!(
            "{header}NVIDIA X\t130100\tf16\t2048\t4096\t4096\thalf\tmaybe\t66\t23\t35\t1\t0\t0\t7\t0\t2\t0.1\n"
        );
        assert!(parse_table(&bad_choice)
            .unwrap_err()
            .contains("choice `maybe`"));
        let bad_out = bad_choice.replace("half\tmaybe", "f64\tlt");
        assert!(parse_table(&bad_out).unwrap_err().contains("out `f64`"));
        let ok = bad_choice.replace("maybe", "gemm_ex");
        let parsed = parse_table(&ok).expect("a valid line parses");
        assert_eq!(parsed[0].choice, TableChoice::GemmEx);
        assert_eq!(parsed[0].out, GemmOut::Half);
    }
}
