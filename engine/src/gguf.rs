//! A validating reader of llama.cpp's GGUF files (versions 2 and 3).
//!
//! Layout: `"GGUF" | version u32 | tensor_count u64 | kv_count u64 | kv pairs | tensor infos |
//! padding to general.alignment | tensor data`. Every count and length read from the file is
//! checked against the bytes actually left before anything is allocated, so a lying header
//! gives an error, not an out-of-memory abort.

use crate::error::{format_err, io_err, EngineError, Result};
use crate::tensors::{TensorFormat, TensorInfo, TensorStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vellum_quant::{BlockFormat, DType, DecodedFormat};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, for any non-negative integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A parsed GGUF file: metadata, tensor infos (in Hugging Face `[rows, cols]` order) and
/// the memory-mapped data they point into.
pub struct GgufFile {
    pub meta: GgufMeta,
    /// Tensors in file order, with GGUF names.
    pub tensors: Vec<TensorInfo>,
    data: memmap2::Mmap,
    data_start: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only; a file truncated under us by another process is
        // outside what any loader can defend against (same as llama.cpp and safetensors).
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let (version, metadata, tensors, data_start) =
            parse(&data).map_err(|m| format_err(path, m))?;
        Ok(GgufFile {
            meta: GgufMeta {
                path: path.to_path_buf(),
                version,
                metadata,
            },
            tensors,
            data,
            data_start,
        })
    }

    /// The bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset;
        &self.data[start..start + info.byte_len]
    }

    /// Moves the tensors into a store, renamed by `rename` (GGUF names to Hugging Face ones).
    pub fn into_store(self, rename: impl Fn(&str) -> String) -> Result<(TensorStore, GgufMeta)> {
        let mut store = TensorStore::default();
        let tensors = self
            .tensors
            .into_iter()
            .map(|mut t| {
                t.name = rename(&t.name);
                t
            })
            .collect();
        store.add_file(&self.meta.path, self.data, self.data_start, tensors)?;
        Ok((store, self.meta))
    }
}

/// The metadata of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufMeta {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
}

impl GgufMeta {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned metadata value, with an error naming the key.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| EngineError::Config {
                path: self.path.clone(),
                field: key.to_string(),
                msg: "missing or not an unsigned integer".into(),
            })
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| EngineError::Config {
                path: self.path.clone(),
                field: key.to_string(),
                msg: "missing or not a string".into(),
            })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, only {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count that claims `count` items of at least `min_size` bytes each: rejected at once
    /// when the file cannot possibly hold them.
    fn count(&mut self, what: &str, min_size: usize) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_size as u64) > self.remaining() as u64 {
            return Err(format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> std::result::Result<Value, String> {
        let w = |s: &[u8]| s.to_vec();
        Ok(match ty {
            0 => Value::U8(self.take(1, key)?[0]),
            1 => Value::I8(self.take(1, key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(
                w(self.take(2, key)?).try_into().expect("2"),
            )),
            3 => Value::I16(i16::from_le_bytes(
                w(self.take(2, key)?).try_into().expect("2"),
            )),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.take(1, key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let elem = self.u32(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("metadata `{key}`: unknown array element type {t}")),
                };
                let n = self.count(&format!("metadata `{key}` array length"), min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => return Err(format!("metadata `{key}`: unknown value type {t}")),
        })
    }
}

/// The tensor format of a ggml type id, or None when Vellum cannot run it.
fn ggml_format(ty: u32) -> Option<TensorFormat> {
    Some(match ty {
        0 => TensorFormat::Dense(DType::F32),
        1 => TensorFormat::Dense(DType::F16),
        30 => TensorFormat::Dense(DType::BF16),
        2 => TensorFormat::Block(BlockFormat::Q4_0),
        3 => TensorFormat::Block(BlockFormat::Q4_1),
        8 => TensorFormat::Block(BlockFormat::Q8_0),
        _ => TensorFormat::Decoded(DecodedFormat::from_ggml_type(ty)?),
    })
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>, usize);

/// Parses GGUF bytes already in memory (what `GgufFile::open` does after mapping the file):
/// `(version, metadata, tensors, data start)`, or a message saying what is wrong.
pub fn parse_bytes(buf: &[u8]) -> std::result::Result<Parsed, String> {
    parse(buf)
}

fn parse(buf: &[u8]) -> std::result::Result<Parsed, String> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format!(
            "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        ));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    // Minimum encoded sizes: a tensor info is name(8) + n_dims(4) + type(4) + offset(8);
    // a kv pair is key(8) + type(4) + at least one byte of value.
    let n_tensors = r.count("tensor count", 24)?;
    let n_kv = r.count("metadata count", 13)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, &key, 0)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&name)? as usize;
        if !(1..=4).contains(&n_dims) {
            return Err(format!(
                "tensor `{name}`: {n_dims} dimensions (1 to 4 supported)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let ty = r.u32(&name)?;
        let offset = r.u64(&name)?;
        let format = ggml_format(ty).ok_or_else(|| {
            format!("tensor `{name}`: ggml type {ty} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q2_K to Q6_K, IQ4_NL and IQ4_XS are)")
        })?;
        // GGUF lists dims fastest-first; Hugging Face order is the reverse.
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        let n = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= 1 << 40)
            .ok_or_else(|| format!("tensor `{name}`: absurd shape {shape:?}"))?;
        let byte_len = format
            .bytes_for(n as usize)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        if offset % alignment as u64 != 0 {
            return Err(format!(
                "tensor `{name}`: data offset {offset} is not aligned to {alignment}"
            ));
        }
        tensors.push(TensorInfo {
            name,
            format,
            shape,
            offset: offset as usize,
            byte_len,
        });
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let data_len = buf.len().saturating_sub(data_start);
    let mut spans: Vec<(usize, usize, &str)> = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let end = t.offset.saturating_add(t.byte_len);
        if end > data_len {
            return Err(format!(
                "tensor `{}`: data [{}, {end}) lies outside the {data_len} data bytes (truncated file?)",
                t.name, t.offset
            ));
        }
        spans.push((t.offset, end, &t.name));
    }
    spans.sort();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(format!(
                "tensors `{}` and `{}` overlap",
                pair[0].2, pair[1].2
            ));
        }
    }
    Ok((version, metadata, tensors, data_start))
}
