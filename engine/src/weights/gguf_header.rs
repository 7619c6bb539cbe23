//! A bounded reader of a GGUF file's header: metadata and tensor directory, no tensor data.
//!
//! Why not candle's `Content::read`: it sizes vectors by counts and lengths taken from the file
//! before reading them, so a header claiming 2^62 entries aborts the process. Here every count or
//! length read from the file is first checked against the bytes still left in it (each item needs
//! at least a known number of bytes), so nothing is ever sized beyond the file; every tensor's data
//! range is checked to lie inside the file with checked arithmetic. The result is candle's
//! `Content`, so the tensor data is then read with candle's own `TensorInfo::read`.

use std::collections::HashMap;
use std::fmt::Display;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use super::gguf::metadata_u64;
use super::{with_power_of_two, WeightsError};

/// Arrays of arrays deeper than this are refused: real files nest at most once, and the reader
/// recurses once per level.
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml tensors have at most four dimensions (GGML_MAX_DIMS).
const MAX_TENSOR_DIMS: u32 = 4;
/// The GGUF default when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted (llama.cpp writes 32; this leaves room for page sizes).
const MAX_ALIGNMENT: u64 = 1 << 16;

/// GGML type ids this reader knows (ggml.h `enum ggml_type`), with candle's type for each.
const GGML_TYPES: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// A GGUF header read within the file's bounds.
#[derive(Debug)]
pub struct GgufHeader {
    pub content: Content,
    /// Size of the whole file in bytes.
    pub file_len: u64,
}

/// Bytes one tensor of `dtype` with `elems` elements takes, or None on overflow or partial block.
pub(super) fn tensor_bytes(dtype: GgmlDType, elems: u64) -> Option<u64> {
    let block = dtype.block_size() as u64;
    if !elems.is_multiple_of(block) {
        return None;
    }
    (elems / block).checked_mul(dtype.type_size() as u64)
}

/// Reads the header of the GGUF file at `path`.
pub fn read_gguf_header(path: &Path) -> Result<GgufHeader, WeightsError> {
    let io_error = |error| WeightsError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(io_error)?;
    let file_len = file.metadata().map_err(io_error)?.len();
    let mut cursor = Cursor {
        reader: BufReader::new(file),
        pos: 0,
        len: file_len,
        path,
        wide: true,
    };
    let magic = cursor.read_magic()?;
    let tensor_count = cursor.bounded_count("the tensor count", cursor.min_tensor_info_bytes())?;
    let metadata_count = cursor.bounded_count("the metadata count", cursor.min_entry_bytes())?;
    let mut metadata = HashMap::with_capacity(metadata_count);
    for index in 0..metadata_count {
        let key = cursor.string(&format!("metadata entry {index}: the key"))?;
        let what = format!("metadata `{key}`");
        let type_id = cursor.u32(&what)?;
        let value = cursor.value(&what, type_id, 0)?;
        if metadata.insert(key, value).is_some() {
            return Err(cursor.error(format!("{what} appears twice")));
        }
    }
    let mut tensor_infos = HashMap::with_capacity(tensor_count);
    let mut order = Vec::with_capacity(tensor_count);
    for index in 0..tensor_count {
        let name = cursor.string(&format!("tensor entry {index}: the name"))?;
        let info = cursor.tensor_info(&name)?;
        if tensor_infos.contains_key(&name) {
            return Err(cursor.error(format!("tensor `{name}` appears twice")));
        }
        order.push(name.clone());
        tensor_infos.insert(name, info);
    }
    let alignment = alignment(&metadata).map_err(|reason| cursor.error(reason))?;
    let tensor_data_offset = cursor
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .filter(|offset| tensor_count == 0 || *offset <= file_len)
        .ok_or_else(|| cursor.error("the tensor data would start past the end of the file"))?;
    for name in &order {
        check_tensor_range(
            &tensor_infos[name],
            name,
            tensor_data_offset,
            alignment,
            file_len,
        )
        .map_err(|reason| cursor.error(reason))?;
    }
    Ok(GgufHeader {
        content: Content {
            magic,
            metadata,
            tensor_infos,
            tensor_data_offset,
        },
        file_len,
    })
}

/// `general.alignment`: a power of two (the spec's rule), default 32.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, String> {
    let Some(value) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    metadata_u64(value)
        .filter(|a| a.is_power_of_two() && *a <= MAX_ALIGNMENT)
        .ok_or_else(|| {
            format!("metadata `general.alignment`: expected a power of two up to {MAX_ALIGNMENT}, found {value:?}")
        })
}

/// The tensor's data must be whole blocks, aligned, and inside the file.
fn check_tensor_range(
    info: &TensorInfo,
    name: &str,
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<(), String> {
    let dims = info.shape.dims();
    let dtype = info.ggml_dtype;
    let describe = || format!("tensor `{name}` (shape {dims:?}, {dtype:?})");
    // candle lists dims outermost first; a ggml row (the innermost dim) must be whole blocks.
    let row = dims.last().copied().unwrap_or(1) as u64;
    if !row.is_multiple_of(dtype.block_size() as u64) {
        return Err(format!(
            "{}: rows of {row} elements are not whole blocks of {}",
            describe(),
            dtype.block_size()
        ));
    }
    let bytes = dims
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d as u64))
        .and_then(|elems| tensor_bytes(dtype, elems));
    let Some(bytes) = bytes else {
        return Err(format!("{}: its size overflows 64 bits", describe()));
    };
    if !info.offset.is_multiple_of(alignment) {
        return Err(format!(
            "{}: data offset {} is not a multiple of the alignment {alignment}",
            describe(),
            info.offset
        ));
    }
    let end = data_offset
        .checked_add(info.offset)
        .and_then(|start| start.checked_add(bytes));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "{}: its {bytes} bytes at data offset {} run past the end of the file ({file_len} bytes)",
            describe(),
            info.offset
        )),
    }
}

/// A GGUF value type's name and the fewest bytes one value of it takes in the file.
fn value_type(type_id: u32, wide: bool) -> Option<(&'static str, u64)> {
    let length_bytes = if wide { 8 } else { 4 };
    Some(match type_id {
        0 => ("u8", 1),
        1 => ("i8", 1),
        2 => ("u16", 2),
        3 => ("i16", 2),
        4 => ("u32", 4),
        5 => ("i32", 4),
        6 => ("f32", 4),
        7 => ("bool", 1),
        8 => ("string", length_bytes),
        // An array is its element type (u32) and its length.
        9 => ("array", 4 + length_bytes),
        10 => ("u64", 8),
        11 => ("i64", 8),
        12 => ("f64", 8),
        _ => return None,
    })
}

/// Reads the header front to back, knowing the file's length.
struct Cursor<'p> {
    reader: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'p Path,
    /// GGUF v2 and v3 store counts and lengths as u64; v1 as u32.
    wide: bool,
}

impl Cursor<'_> {
    fn error(&self, reason: impl Display) -> WeightsError {
        WeightsError::Parse {
            path: self.path.to_path_buf(),
            reason: format!("GGUF header: {reason}"),
        }
    }

    fn left(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WeightsError> {
        if self.left() < N as u64 {
            return Err(self.error(format!(
                "{what}: the file ends at byte {} (truncated?)",
                self.len
            )));
        }
        let mut buffer = [0u8; N];
        self.fill(&mut buffer)?;
        Ok(buffer)
    }

    /// Reads exactly `buffer.len()` bytes (the caller checked they are left in the file).
    fn fill(&mut self, buffer: &mut [u8]) -> Result<(), WeightsError> {
        self.reader
            .read_exact(buffer)
            .map_err(|error| WeightsError::Io {
                path: self.path.to_path_buf(),
                error,
            })?;
        self.pos += buffer.len() as u64;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, WeightsError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, WeightsError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// A count or length: u64 in v2/v3, u32 in v1.
    fn length(&mut self, what: &str) -> Result<u64, WeightsError> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// A count of items that each take at least `min_item_bytes`: refused when the items cannot
    /// fit in the bytes left, so the count can size a vector.
    fn bounded_count(&mut self, what: &str, min_item_bytes: u64) -> Result<usize, WeightsError> {
        let count = self.length(what)?;
        let fits = count
            .checked_mul(min_item_bytes)
            .is_some_and(|needed| needed <= self.left());
        if fits {
            return Ok(count as usize);
        }
        let (left, len) = (self.left(), self.len);
        let count = with_power_of_two(count);
        Err(self.error(if min_item_bytes == 1 {
            format!("{what} is {count} bytes, more than the {left} bytes left of the {len}-byte file")
        } else {
            format!(
                "{what} is {count}, but that many items of at least {min_item_bytes} bytes each cannot fit in the {left} bytes left of the {len}-byte file"
            )
        }))
    }

    fn read_magic(&mut self) -> Result<VersionedMagic, WeightsError> {
        let magic = self.bytes::<4>("the magic number")?;
        if &magic != b"GGUF" {
            return Err(self.error(format!(
                "the file does not start with `GGUF` (found {magic:02x?}); not a GGUF file"
            )));
        }
        let version = self.u32("the version")?;
        let magic = match version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            other => {
                return Err(self.error(format!(
                    "version {other} is not supported (1, 2 and 3 are); a big-endian file?"
                )))
            }
        };
        self.wide = version >= 2;
        Ok(magic)
    }

    fn min_entry_bytes(&self) -> u64 {
        // A key (its length, at least one byte), a type id and the smallest value (one byte).
        let length_bytes = if self.wide { 8 } else { 4 };
        length_bytes + 1 + 4 + 1
    }

    fn min_tensor_info_bytes(&self) -> u64 {
        // A name (its length), the dimension count, the type id and the offset.
        let length_bytes = if self.wide { 8 } else { 4 };
        length_bytes + 4 + 4 + 8
    }

    fn string(&mut self, what: &str) -> Result<String, WeightsError> {
        let len = self.bounded_count(&format!("{what}: the string length"), 1)?;
        let mut bytes = vec![0u8; len];
        self.fill(&mut bytes)?;
        // Like llama.cpp and candle: some writers add NUL terminators, and text is taken lossily.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn value(&mut self, what: &str, type_id: u32, depth: usize) -> Result<Value, WeightsError> {
        if value_type(type_id, self.wide).is_none() {
            return Err(self.error(format!("{what}: unknown value type {type_id}")));
        }
        Ok(match type_id {
            0 => Value::U8(self.bytes::<1>(what)?[0]),
            1 => Value::I8(self.bytes::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(self.error(format!("{what}: {other} is not a boolean"))),
            },
            8 => Value::String(self.string(what)?),
            9 => self.array(what, depth)?,
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            _ => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
        })
    }

    fn array(&mut self, what: &str, depth: usize) -> Result<Value, WeightsError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.error(format!(
                "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            )));
        }
        let element_type = self.u32(what)?;
        let Some((type_name, min_bytes)) = value_type(element_type, self.wide) else {
            return Err(self.error(format!("{what}: unknown array element type {element_type}")));
        };
        let count = self.bounded_count(
            &format!("{what}: the length of an array of {type_name}"),
            min_bytes,
        )?;
        let mut values = Vec::with_capacity(count);
        for index in 0..count {
            values.push(self.value(&format!("{what}[{index}]"), element_type, depth + 1)?);
        }
        Ok(Value::Array(values))
    }

    fn tensor_info(&mut self, name: &str) -> Result<TensorInfo, WeightsError> {
        let what = format!("tensor `{name}`");
        let n_dims = self.u32(&what)?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(self.error(format!(
                "{what}: {n_dims} dimensions (ggml tensors have at most {MAX_TENSOR_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let dim = self.length(&what)?;
            let dim = usize::try_from(dim).map_err(|_| {
                self.error(format!("{what}: dimension {dim} does not fit in memory"))
            })?;
            dims.push(dim);
        }
        // GGUF lists dims innermost first; candle (and PyTorch) outermost first.
        dims.reverse();
        let type_id = self.u32(&what)?;
        let ggml_dtype = GGML_TYPES
            .iter()
            .find(|(id, _)| *id == type_id)
            .map(|(_, dtype)| *dtype)
            .ok_or_else(|| self.error(format!("{what}: unknown element type id {type_id}")))?;
        let offset = self.u64(&what)?;
        Ok(TensorInfo {
            ggml_dtype,
            shape: candle_core::Shape::from(dims),
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tensor_count: u64, metadata_count: u64, body: &[u8]) -> Vec<u8> {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&tensor_count.to_le_bytes());
        bytes.extend_from_slice(&metadata_count.to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn read(name: &str, bytes: &[u8]) -> Result<GgufHeader, WeightsError> {
        let dir = std::env::temp_dir().join(format!("gguf-header-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        read_gguf_header(&path)
    }

    fn string(text: &str) -> Vec<u8> {
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes
    }

    #[test]
    fn absurd_counts_and_lengths_are_refused_before_anything_is_sized() {
        let err = read("tensors.gguf", &header(1 << 62, 0, &[0; 64])).unwrap_err();
        assert!(
            err.to_string()
                .contains("the tensor count is 4611686018427387904"),
            "{err}"
        );
        let err = read("metadata.gguf", &header(0, 1 << 62, &[0; 64])).unwrap_err();
        assert!(err.to_string().contains("the metadata count"), "{err}");
        let mut body = (1u64 << 62).to_le_bytes().to_vec();
        body.extend_from_slice(b"general.name");
        let err = read("key.gguf", &header(0, 1, &body)).unwrap_err();
        assert!(
            err.to_string().contains("the key: the string length"),
            "{err}"
        );
        let mut body = string("tokenizer.ggml.merges");
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(&8u32.to_le_bytes());
        body.extend_from_slice(&(1u64 << 62).to_le_bytes());
        let err = read("array.gguf", &header(0, 1, &body)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`tokenizer.ggml.merges`: the length of an array of string"),
            "{text}"
        );
        assert!(text.contains("array.gguf"), "{text}");
    }

    /// A file with one f32 tensor `w` of GGUF dims `dims` at data offset 0, padded with 32 bytes
    /// of data after the aligned header.
    fn one_tensor(dims: [u64; 2]) -> Vec<u8> {
        let mut body = string("w");
        body.extend_from_slice(&2u32.to_le_bytes());
        for dim in dims {
            body.extend_from_slice(&dim.to_le_bytes());
        }
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        let mut bytes = header(1, 0, &body);
        bytes.resize(bytes.len().div_ceil(32) * 32 + 32, 0);
        bytes
    }

    #[test]
    fn tensor_data_outside_the_file_is_refused() {
        let err = read("dims.gguf", &one_tensor([1 << 40, 4])).unwrap_err();
        assert!(
            err.to_string().contains("run past the end of the file"),
            "{err}"
        );
        // [4, 2] f32 = the 32 bytes after the aligned header.
        let header = read("ok.gguf", &one_tensor([2, 4])).unwrap();
        assert_eq!(header.content.tensor_infos["w"].shape.dims(), &[4, 2]);
    }

    #[test]
    fn deep_arrays_and_bad_alignment_are_refused() {
        // The entry's type id, then each array's element type (an array again) and length 1.
        let mut body = string("nested");
        body.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..8 {
            body.extend_from_slice(&9u32.to_le_bytes());
            body.extend_from_slice(&1u64.to_le_bytes());
        }
        body.extend_from_slice(&[0; 16]);
        let err = read("deep.gguf", &header(0, 1, &body)).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");

        let mut body = string("general.alignment");
        body.extend_from_slice(&4u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let err = read("align.gguf", &header(0, 1, &body)).unwrap_err();
        assert!(err.to_string().contains("general.alignment"), "{err}");
    }
}
