//! Readers, writers and the error type shared by every format.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a trace file could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid UTF-8 text.
    #[error("{path}: not UTF-8 text (byte {byte_offset})")]
    NotUtf8 { path: PathBuf, byte_offset: usize },
    /// The file does not parse; `location` is a line/column or a field path.
    #[error("{path}: {location}: {message}")]
    Parse {
        path: PathBuf,
        location: String,
        message: String,
    },
    /// The file parses but a value is out of range or inconsistent.
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl TraceError {
    pub fn invalid(path: &Path, field: impl Into<String>, message: impl fmt::Display) -> Self {
        TraceError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TraceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a whole file as UTF-8 text, with errors naming the file.
pub fn read_text(path: &Path) -> Result<String, TraceError> {
    let bytes = std::fs::read(path).map_err(|e| TraceError::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| TraceError::NotUtf8 {
        path: path.to_path_buf(),
        byte_offset: e.utf8_error().valid_up_to(),
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed, then
/// renamed over the target. An interrupted run therefore never leaves a half-written file that
/// looks complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TraceError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| TraceError::io(dir, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(TraceError::io(path, e));
    }
    Ok(())
}

/// Serializes `value` as pretty JSON (with a trailing newline) and writes it atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), TraceError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| TraceError::Parse {
        path: path.to_path_buf(),
        location: "serialize".into(),
        message: e.to_string(),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file into `T`; errors carry the line and column.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, TraceError> {
    let text = read_text(path)?;
    parse_json(path, &text)
}

/// Parses JSON text that came from `path` (used for embedded copies too).
pub fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, TraceError> {
    serde_json::from_str(text).map_err(|e| TraceError::Parse {
        path: path.to_path_buf(),
        location: format!("line {} column {}", e.line(), e.column()),
        message: e.to_string(),
    })
}

/// Parses TOML text that came from `path` (used for embedded copies too); errors carry the line.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, TraceError> {
    toml::from_str(text).map_err(|e| {
        let location = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            }
            None => "document".to_string(),
        };
        TraceError::Parse {
            path: path.to_path_buf(),
            location,
            message: e.message().to_string(),
        }
    })
}

/// Serializes rows as CSV with a header and writes them atomically.
pub fn write_csv_atomic<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), TraceError> {
    let bytes = csv_bytes(rows).map_err(|e| TraceError::Parse {
        path: path.to_path_buf(),
        location: "serialize".into(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Rows as CSV bytes with a header line. An empty slice gives no bytes at all (the header comes
/// from the first row); use [`csv_bytes_with_header`] where an empty table must still say its
/// columns.
pub fn csv_bytes<T: Serialize>(rows: &[T]) -> Result<Vec<u8>, csv::Error> {
    let mut writer = csv::WriterBuilder::new()
        .has_headers(true)
        .from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    writer.flush()?;
    writer
        .into_inner()
        .map_err(|e| csv::Error::from(e.into_error()))
}

/// Rows as CSV bytes with a header line, also for an empty slice (the header of a default row).
/// Run directories use it: a run without swaps wrote an empty `swaps.csv`, which readers (ours
/// included, now) reject as a file with no header (found by the robust-input tests).
pub fn csv_bytes_with_header<T: Serialize + Default>(rows: &[T]) -> Result<Vec<u8>, csv::Error> {
    if !rows.is_empty() {
        return csv_bytes(rows);
    }
    let one = csv_bytes(&[T::default()])?;
    let header_end = one
        .iter()
        .position(|&b| b == b'\n')
        .map_or(one.len(), |i| i + 1);
    Ok(one[..header_end].to_vec())
}

/// Reads a CSV file with a header into rows; an error names the line.
pub fn read_csv<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, TraceError> {
    let text = read_text(path)?;
    parse_csv(path, text.as_bytes())
}

/// Parses CSV bytes that came from `path`.
pub fn parse_csv<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Vec<T>, TraceError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes);
    // An empty file has no header: it is a truncated file, not a table without rows (our writer
    // always writes the header).
    let header_ok = reader.headers().map(|h| !h.is_empty()).unwrap_or(false);
    if !header_ok {
        return Err(TraceError::Parse {
            path: path.to_path_buf(),
            location: "line 1".into(),
            message: "no header line (empty or unreadable file)".into(),
        });
    }
    let headers = reader.headers().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for (index, row) in reader.deserialize::<T>().enumerate() {
        match row {
            Ok(row) => rows.push(row),
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(index as u64 + 2);
                return Err(TraceError::Parse {
                    path: path.to_path_buf(),
                    location: format!("line {line}"),
                    message: csv_message(&e, &headers),
                });
            }
        }
    }
    Ok(rows)
}

/// A CSV error in the reader's words, the bad column named by its header rather than by its
/// position (the csv crate says "field 3", which a reader has to count out).
fn csv_message(e: &csv::Error, headers: &csv::StringRecord) -> String {
    if let csv::ErrorKind::Deserialize { err, .. } = e.kind() {
        let column = err
            .field()
            .and_then(|i| headers.get(i as usize).map(|name| (i, name)));
        if let Some((i, name)) = column {
            return format!("column `{name}` (column {}): {}", i + 1, err.kind());
        }
        return err.kind().to_string();
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("djinn-traces-io-{}", std::process::id()));
        let path = dir.join("a.json");
        write_json_atomic(&path, &vec![1, 2, 3]).unwrap();
        let back: Vec<i32> = read_json(&path).unwrap();
        assert_eq!(back, vec![1, 2, 3]);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the target remains: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_value_is_named_by_its_column_header() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Row {
            a: u32,
            b: u32,
        }
        let err = parse_csv::<Row>(Path::new("r.csv"), b"a,b\n1,2\n3,x\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.csv") && err.contains("line 3") && err.contains("column `b`"),
            "{err}"
        );
    }

    #[test]
    fn non_utf8_is_reported_with_offset() {
        let dir = std::env::temp_dir().join(format!("djinn-traces-utf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, b"ab\xffcd").unwrap();
        let err = read_text(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("byte 2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
