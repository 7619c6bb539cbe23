//! Reading a `turns` trace: per-session turn lists from CSV or JSONL, checked row by row.
//!
//! Columns (CSV header, or JSONL keys): `session` (any string id), `turn` (order within the
//! session; rows may come in any order), `new_tokens`, `output_tokens`, exactly one of
//! `pause_s` (the pause after the turn; empty for a session's last turn) and `time_s` (the
//! turn's absolute arrival), and optionally `hint_s`, `context_tokens` and `prefix_group` (the
//! name of a spec's `[[prefix_groups]]` entry whose tokens open the session's first prompt; one
//! name per session, on any of its rows, the others empty or the same). Every error names the
//! file, the line and the column. Values are bounded before anything is sized by them.

use std::collections::BTreeMap;
use std::path::Path;

use traces::workload::CONTEXT_TOKENS_MAX;
use traces::TraceError;

/// Columns a turns file may have, in the order the docs list them.
pub const COLUMNS: [&str; 9] = [
    "session",
    "turn",
    "new_tokens",
    "output_tokens",
    "pause_s",
    "time_s",
    "hint_s",
    "context_tokens",
    "prefix_group",
];
const REQUIRED: [&str; 4] = ["session", "turn", "new_tokens", "output_tokens"];

/// Largest `turn` number (an ordering key only, never a size).
pub const TURN_MAX: f64 = 1e9;
/// Largest pause or hint, in seconds (about three years).
pub const PAUSE_S_MAX: f64 = 1e8;
/// Largest absolute time, in seconds (Unix times of this century fit).
pub const TIME_S_MAX: f64 = 1e10;
/// Longest session id, in bytes.
pub const SESSION_ID_MAX: usize = 256;

/// One turn of a session as the file gives it (unscaled).
#[derive(Clone, Debug, PartialEq)]
pub struct FileTurn {
    pub new_tokens: u32,
    pub output_tokens: u32,
    /// The pause after this turn in seconds (`None` after the last).
    pub pause_s: Option<f64>,
    pub hint_s: Option<f64>,
    pub context_tokens: Option<u32>,
}

/// One session: its turns in order and, for files with `time_s`, its first turn's time.
#[derive(Clone, Debug, PartialEq)]
pub struct FileSession {
    pub id: String,
    pub start_s: Option<f64>,
    /// Index (in the spec's `[[prefix_groups]]`) of the group whose prefix opens the session.
    pub prefix_group: Option<u32>,
    pub turns: Vec<FileTurn>,
}

/// The syntax of a turns file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    Csv,
    Jsonl,
}

impl Syntax {
    /// The syntax a `[replay] format` names, or (for plain `turns`) the file's extension gives.
    pub fn of(format: &str, file: &str) -> Result<Syntax, TraceError> {
        match format {
            "turns-csv" => return Ok(Syntax::Csv),
            "turns-jsonl" => return Ok(Syntax::Jsonl),
            _ => {}
        }
        let lower = file.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Ok(Syntax::Csv)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Ok(Syntax::Jsonl)
        } else {
            Err(TraceError::invalid(
                Path::new(file),
                "document",
                "cannot tell CSV from JSONL by the extension (.csv, .jsonl): set [replay] format = \"turns-csv\" or \"turns-jsonl\"",
            ))
        }
    }
}

/// A cell before checking: text (CSV, or a JSON string), a JSON number, or empty.
#[derive(Clone, Copy, Debug)]
enum Cell<'a> {
    Text(&'a str),
    Number(f64),
    Empty,
}

/// One row, checked cell by cell.
struct Row {
    line: u64,
    session: String,
    turn: f64,
    new_tokens: u32,
    output_tokens: u32,
    pause_s: Option<f64>,
    time_s: Option<f64>,
    hint_s: Option<f64>,
    context_tokens: Option<u32>,
    prefix_group: Option<String>,
}

/// Parses a turns file into sessions in file order (by first `time_s` when the file has
/// times, else by first appearance), each with its turns in `turn` order. `groups` are the
/// names of the spec's `[[prefix_groups]]`, which a `prefix_group` cell must name.
pub fn parse_turns(
    file: &str,
    text: &str,
    syntax: Syntax,
    groups: &[&str],
) -> Result<Vec<FileSession>, TraceError> {
    let path = Path::new(file);
    let rows = match syntax {
        Syntax::Csv => csv_rows(path, text)?,
        Syntax::Jsonl => jsonl_rows(path, text)?,
    };
    if rows.is_empty() {
        return Err(TraceError::invalid(path, "document", "no turns"));
    }
    sessions(path, rows, groups)
}

fn err(path: &Path, line: u64, column: &str, message: impl std::fmt::Display) -> TraceError {
    TraceError::Parse {
        path: path.to_path_buf(),
        location: format!("line {line}: column `{column}`"),
        message: message.to_string(),
    }
}

/// Checks a header (or a JSONL line's keys): every name known, none twice, the required ones
/// and exactly one of `pause_s` and `time_s` present (a JSONL line may leave out `pause_s`:
/// a session's last turn has none).
fn check_columns<'a>(
    path: &Path,
    line: u64,
    names: impl Iterator<Item = &'a str>,
    pause_may_be_absent: bool,
) -> Result<(), TraceError> {
    let mut seen: Vec<&str> = Vec::new();
    for name in names {
        if !COLUMNS.contains(&name) {
            return Err(err(
                path,
                line,
                name,
                format!("unknown column (known: {})", COLUMNS.join(", ")),
            ));
        }
        if seen.contains(&name) {
            return Err(err(path, line, name, "given twice"));
        }
        seen.push(name);
    }
    for name in REQUIRED {
        if !seen.contains(&name) {
            return Err(err(path, line, name, "missing"));
        }
    }
    match (seen.contains(&"pause_s"), seen.contains(&"time_s")) {
        (true, true) => Err(err(
            path,
            line,
            "time_s",
            "give either pause_s or time_s, not both",
        )),
        (false, false) if !pause_may_be_absent => {
            Err(err(path, line, "pause_s", "missing (or give time_s)"))
        }
        _ => Ok(()),
    }
}

fn csv_rows(path: &Path, text: &str) -> Result<Vec<Row>, TraceError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let parse_err = |line: u64, e: csv::Error| TraceError::Parse {
        path: path.to_path_buf(),
        location: format!("line {line}"),
        message: e.to_string(),
    };
    let header = reader.headers().map_err(|e| parse_err(1, e))?.clone();
    check_columns(path, 1, header.iter(), false)?;
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                return Err(parse_err(line, e));
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        let cells = header.iter().zip(record.iter()).map(|(name, value)| {
            let cell = if value.is_empty() {
                Cell::Empty
            } else {
                Cell::Text(value)
            };
            (name, cell)
        });
        rows.push(row(path, line, cells)?);
    }
    Ok(rows)
}

fn jsonl_rows(path: &Path, text: &str) -> Result<Vec<Row>, TraceError> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
            .map_err(|e| TraceError::Parse {
                path: path.to_path_buf(),
                location: format!("line {line}"),
                message: e.to_string(),
            })?;
        check_columns(path, line, object.keys().map(String::as_str), true)?;
        let mut cells = Vec::with_capacity(object.len());
        for (name, value) in &object {
            let cell = match value {
                serde_json::Value::Null => Cell::Empty,
                serde_json::Value::String(s) if s.is_empty() => Cell::Empty,
                serde_json::Value::String(s) => Cell::Text(s),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(v) => Cell::Number(v),
                    None => return Err(err(path, line, name, "not a representable number")),
                },
                other => {
                    return Err(err(
                        path,
                        line,
                        name,
                        format!("expected a number or a string, got {other}"),
                    ))
                }
            };
            cells.push((name.as_str(), cell));
        }
        rows.push(row(path, line, cells.into_iter())?);
    }
    Ok(rows)
}

/// A number cell: finite, >= 0 and at most `max`.
fn number(path: &Path, line: u64, column: &str, cell: Cell, max: f64) -> Result<f64, TraceError> {
    let v = match cell {
        Cell::Number(v) => v,
        Cell::Text(s) => s
            .parse::<f64>()
            .map_err(|_| err(path, line, column, format!("not a number: {s:?}")))?,
        Cell::Empty => return Err(err(path, line, column, "empty")),
    };
    if !v.is_finite() || v < 0.0 {
        return Err(err(
            path,
            line,
            column,
            format!("must be a finite number >= 0, got {v}"),
        ));
    }
    if v > max {
        return Err(err(
            path,
            line,
            column,
            format!("must be at most {max}, got {v}"),
        ));
    }
    Ok(v)
}

/// A token-count cell: a whole number within the largest supported context.
fn tokens(path: &Path, line: u64, column: &str, cell: Cell) -> Result<u32, TraceError> {
    let v = number(path, line, column, cell, CONTEXT_TOKENS_MAX as f64)?;
    if v.fract() != 0.0 {
        return Err(err(
            path,
            line,
            column,
            format!("must be a whole number, got {v}"),
        ));
    }
    Ok(v as u32)
}

fn row<'a>(
    path: &Path,
    line: u64,
    cells: impl Iterator<Item = (&'a str, Cell<'a>)>,
) -> Result<Row, TraceError> {
    let mut r = Row {
        line,
        session: String::new(),
        turn: 0.0,
        new_tokens: 0,
        output_tokens: 0,
        pause_s: None,
        time_s: None,
        hint_s: None,
        context_tokens: None,
        prefix_group: None,
    };
    let optional = |cell: Cell| !matches!(cell, Cell::Empty);
    for (name, cell) in cells {
        match name {
            "session" => {
                r.session = match cell {
                    Cell::Text(s) => s.to_string(),
                    // A JSON number id (integral ids print without a fraction).
                    Cell::Number(v) => format!("{v}"),
                    Cell::Empty => return Err(err(path, line, name, "empty")),
                };
                if r.session.len() > SESSION_ID_MAX {
                    return Err(err(
                        path,
                        line,
                        name,
                        format!("longer than {SESSION_ID_MAX} bytes"),
                    ));
                }
            }
            "turn" => {
                r.turn = number(path, line, name, cell, TURN_MAX)?;
                if r.turn.fract() != 0.0 {
                    return Err(err(
                        path,
                        line,
                        name,
                        format!("must be a whole number, got {}", r.turn),
                    ));
                }
            }
            "new_tokens" => r.new_tokens = tokens(path, line, name, cell)?,
            "output_tokens" => {
                r.output_tokens = tokens(path, line, name, cell)?;
                if r.output_tokens == 0 {
                    return Err(err(path, line, name, "must be >= 1 (every call generates)"));
                }
            }
            "pause_s" if optional(cell) => {
                r.pause_s = Some(number(path, line, name, cell, PAUSE_S_MAX)?)
            }
            "time_s" => r.time_s = Some(number(path, line, name, cell, TIME_S_MAX)?),
            "hint_s" if optional(cell) => {
                r.hint_s = Some(number(path, line, name, cell, PAUSE_S_MAX)?)
            }
            "context_tokens" if optional(cell) => {
                r.context_tokens = Some(tokens(path, line, name, cell)?)
            }
            "prefix_group" => {
                r.prefix_group = match cell {
                    Cell::Text(s) => Some(s.to_string()),
                    Cell::Number(v) => Some(format!("{v}")),
                    Cell::Empty => None,
                }
            }
            _ => {}
        }
    }
    Ok(r)
}

/// Groups rows into sessions, orders turns, derives pauses from times and checks each
/// session's sequence (pauses present, times not decreasing, contexts consistent).
fn sessions(path: &Path, rows: Vec<Row>, groups: &[&str]) -> Result<Vec<FileSession>, TraceError> {
    let by_time = rows[0].time_s.is_some();
    // Session id -> index in first-appearance order.
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut grouped: Vec<Vec<Row>> = Vec::new();
    for r in rows {
        if r.time_s.is_some() != by_time {
            let message = if by_time {
                "missing, but the file's first row gives time_s"
            } else {
                "given, but the file's first row gives pause_s"
            };
            return Err(err(path, r.line, "time_s", message));
        }
        let i = *index.entry(r.session.clone()).or_insert_with(|| {
            grouped.push(Vec::new());
            grouped.len() - 1
        });
        grouped[i].push(r);
    }
    let mut out = Vec::with_capacity(grouped.len());
    for mut rows in grouped {
        rows.sort_by(|a, b| a.turn.total_cmp(&b.turn).then(a.line.cmp(&b.line)));
        for pair in rows.windows(2) {
            if pair[0].turn == pair[1].turn {
                return Err(err(
                    path,
                    pair[1].line,
                    "turn",
                    format!(
                        "session {:?} turn {} given twice (also line {})",
                        pair[1].session, pair[1].turn, pair[0].line
                    ),
                ));
            }
        }
        let group = prefix_group(path, &rows, groups)?;
        let mut s = session(path, rows)?;
        s.prefix_group = group;
        out.push(s);
    }
    if by_time {
        // Stable: sessions starting together keep their order of appearance.
        out.sort_by(|a, b| {
            a.start_s
                .unwrap_or(0.0)
                .total_cmp(&b.start_s.unwrap_or(0.0))
        });
    }
    Ok(out)
}

/// The group a session's rows name (at most one name, which the spec must declare).
fn prefix_group(path: &Path, rows: &[Row], groups: &[&str]) -> Result<Option<u32>, TraceError> {
    let mut named: Option<&Row> = None;
    for r in rows {
        let Some(name) = &r.prefix_group else {
            continue;
        };
        match named {
            None => named = Some(r),
            Some(first) if first.prefix_group.as_ref() != Some(name) => {
                return Err(err(
                    path,
                    r.line,
                    "prefix_group",
                    format!(
                        "session {:?} names {name:?} here but {:?} on line {} (one group per session)",
                        r.session,
                        first.prefix_group.as_deref().unwrap_or_default(),
                        first.line
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    let Some(r) = named else {
        return Ok(None);
    };
    let name = r.prefix_group.as_deref().unwrap_or_default();
    match groups.iter().position(|g| *g == name) {
        Some(i) => Ok(Some(i as u32)),
        None if groups.is_empty() => Err(err(
            path,
            r.line,
            "prefix_group",
            format!("names {name:?}, but the spec declares no [[prefix_groups]]"),
        )),
        None => Err(err(
            path,
            r.line,
            "prefix_group",
            format!(
                "names {name:?}, which is not among the spec's [[prefix_groups]] ({})",
                groups.join(", ")
            ),
        )),
    }
}

/// One session's rows (in turn order) to its turns.
fn session(path: &Path, rows: Vec<Row>) -> Result<FileSession, TraceError> {
    let last = rows.len() - 1;
    let mut turns = Vec::with_capacity(rows.len());
    let mut sequence: u64 = 0;
    for (k, r) in rows.iter().enumerate() {
        let pause_s = if k == last {
            None
        } else if let Some(t) = r.time_s {
            let next = rows[k + 1]
                .time_s
                .expect("a time_s file has times on every row");
            if next < t {
                return Err(err(
                    path,
                    rows[k + 1].line,
                    "time_s",
                    format!("{next} is before the previous turn's {t} (line {})", r.line),
                ));
            }
            Some(next - t)
        } else {
            Some(r.pause_s.ok_or_else(|| {
                err(
                    path,
                    r.line,
                    "pause_s",
                    "empty, but this is not the session's last turn",
                )
            })?)
        };
        if k == 0 && r.new_tokens == 0 {
            return Err(err(
                path,
                r.line,
                "new_tokens",
                "must be >= 1 on a session's first turn (its prompt)",
            ));
        }
        let full = sequence + r.new_tokens as u64;
        if let Some(c) = r.context_tokens {
            if k == 0 && c != r.new_tokens {
                return Err(err(
                    path,
                    r.line,
                    "context_tokens",
                    format!(
                        "must equal new_tokens ({}) on a session's first turn",
                        r.new_tokens
                    ),
                ));
            }
            if c < r.new_tokens || c as u64 > full {
                return Err(err(
                    path,
                    r.line,
                    "context_tokens",
                    format!(
                        "must lie between new_tokens ({}) and the previous context plus new_tokens ({full})",
                        r.new_tokens
                    ),
                ));
            }
        }
        let input = r.context_tokens.map_or(full, |c| c as u64);
        sequence = input + r.output_tokens as u64;
        turns.push(FileTurn {
            new_tokens: r.new_tokens,
            output_tokens: r.output_tokens,
            pause_s,
            hint_s: r.hint_s,
            context_tokens: r.context_tokens,
        });
    }
    Ok(FileSession {
        id: rows[0].session.clone(),
        start_s: rows[0].time_s,
        prefix_group: None,
        turns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_in_any_order_group_into_sessions_in_turn_order() {
        let csv = "session,turn,new_tokens,output_tokens,pause_s,hint_s,context_tokens\n\
                   b,1,5,2,,,\n\
                   a,7,10,3,,,\n\
                   a,2,100,4,1.5,2.0,\n\
                   b,0,50,6,0.25,,50\n\
                   a,5,0,3,0.5,,80\n";
        let s = parse_turns("t.csv", csv, Syntax::Csv, &[]).unwrap();
        // Without times: sessions in order of first appearance.
        assert_eq!(
            s.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        let a = &s[1];
        assert_eq!(
            a.turns.iter().map(|t| t.new_tokens).collect::<Vec<_>>(),
            [100, 0, 10]
        );
        assert_eq!(a.turns[0].pause_s, Some(1.5));
        assert_eq!(a.turns[0].hint_s, Some(2.0));
        assert_eq!(a.turns[1].context_tokens, Some(80));
        assert_eq!(a.turns[2].pause_s, None);
        assert_eq!(s[0].start_s, None);
    }

    #[test]
    fn jsonl_times_give_pauses_and_order_sessions_by_start() {
        let jsonl = "{\"session\": 7, \"turn\": 0, \"new_tokens\": 9, \"output_tokens\": 1, \"time_s\": 1700000010.0}\n\
                     \n\
                     {\"session\": \"x\", \"turn\": 0, \"new_tokens\": 9, \"output_tokens\": 1, \"time_s\": 1700000000.0}\n\
                     {\"session\": \"x\", \"turn\": 1, \"new_tokens\": 0, \"output_tokens\": 1, \"time_s\": 1700000002.5, \"hint_s\": null}\n";
        let s = parse_turns("t.jsonl", jsonl, Syntax::Jsonl, &[]).unwrap();
        assert_eq!(s[0].id, "x");
        assert_eq!(s[1].id, "7");
        assert_eq!(s[0].turns[0].pause_s, Some(2.5));
        assert_eq!(s[0].start_s, Some(1_700_000_000.0));
    }

    #[test]
    fn syntax_by_extension_or_explicit_format() {
        assert_eq!(Syntax::of("turns", "a/B.CSV").unwrap(), Syntax::Csv);
        assert_eq!(Syntax::of("turns", "a.jsonl").unwrap(), Syntax::Jsonl);
        assert_eq!(Syntax::of("turns-jsonl", "a.txt").unwrap(), Syntax::Jsonl);
        let e = Syntax::of("turns", "a.txt").unwrap_err().to_string();
        assert!(e.contains("a.txt") && e.contains("turns-csv"), "{e}");
    }

    #[test]
    fn jsonl_rows_must_agree_on_pauses_or_times() {
        let jsonl = "{\"session\": \"a\", \"turn\": 0, \"new_tokens\": 9, \"output_tokens\": 1, \"time_s\": 1.0}\n\
                     {\"session\": \"a\", \"turn\": 1, \"new_tokens\": 9, \"output_tokens\": 1, \"pause_s\": 1.0}\n";
        let e = parse_turns("t.jsonl", jsonl, Syntax::Jsonl, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: column `time_s`"), "{e}");
    }

    #[test]
    fn prefix_group_is_one_declared_name_per_session() {
        let csv = "session,turn,new_tokens,output_tokens,pause_s,prefix_group\n\
                   a,0,100,4,1,\n\
                   a,1,10,4,,sys\n\
                   b,0,100,4,,\n\
                   c,0,100,4,1,tools\n\
                   c,1,10,4,,tools\n";
        let s = parse_turns("t.csv", csv, Syntax::Csv, &["tools", "sys"]).unwrap();
        let groups: Vec<_> = s.iter().map(|x| x.prefix_group).collect();
        assert_eq!(groups, [Some(1), None, Some(0)]);
        let e = parse_turns("t.csv", csv, Syntax::Csv, &["tools"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.csv")
                && e.contains("line 3: column `prefix_group`")
                && e.contains("\"sys\""),
            "{e}"
        );
        let e = parse_turns("t.csv", csv, Syntax::Csv, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("declares no [[prefix_groups]]"), "{e}");
        let two = csv.replace("c,1,10,4,,tools", "c,1,10,4,,sys");
        let e = parse_turns("t.csv", &two, Syntax::Csv, &["tools", "sys"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 6: column `prefix_group`") && e.contains("line 5"),
            "{e}"
        );
    }
}
