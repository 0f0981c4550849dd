//! Tensors found in checkpoint files, independent of the file format, and the safetensors
//! reader.
//!
//! A [`TensorStore`] holds memory-mapped files and a name → tensor index, with every
//! tensor's byte range already checked against its file.

use crate::error::{format_err, io_err, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vellum_quant::{BlockFormat, DType, DecodedFormat, QuantError};

/// How a tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorFormat {
    Dense(DType),
    Block(BlockFormat),
    /// A GGUF block format Vellum has no kernels for, decoded at load (`vellum_quant::ggml`).
    Decoded(DecodedFormat),
    /// Raw bytes (safetensors `U8` / `I8`): quantized values, read through the model's
    /// `quantization_config`.
    U8,
    I8,
}

impl TensorFormat {
    pub fn bytes_for(self, n: usize) -> std::result::Result<usize, QuantError> {
        match self {
            TensorFormat::Dense(d) => Ok(n * d.size()),
            TensorFormat::Block(b) => b.bytes_for(n),
            TensorFormat::Decoded(f) => f.bytes_for(n),
            TensorFormat::U8 | TensorFormat::I8 => Ok(n),
        }
    }

    pub fn name(self) -> String {
        match self {
            TensorFormat::Dense(d) => d.to_string(),
            TensorFormat::Block(b) => b.name().to_string(),
            TensorFormat::Decoded(f) => f.name().to_string(),
            TensorFormat::U8 => "u8".into(),
            TensorFormat::I8 => "i8".into(),
        }
    }
}

/// One tensor of a file: shape in Hugging Face order (`[rows, cols]` for matrices).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub format: TensorFormat,
    pub shape: Vec<usize>,
    /// Offset of the data from the start of the file's data section.
    pub offset: usize,
    pub byte_len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
    data_start: usize,
}

/// A set of memory-mapped checkpoint files and the tensors in them.
#[derive(Default)]
pub struct TensorStore {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, (usize, TensorInfo)>,
}

impl TensorStore {
    /// Adds a file whose tensors were already validated against `map`.
    pub(crate) fn add_file(
        &mut self,
        path: &Path,
        map: memmap2::Mmap,
        data_start: usize,
        tensors: Vec<TensorInfo>,
    ) -> Result<()> {
        let idx = self.files.len();
        for t in tensors {
            if let Some((other, _)) = self.tensors.get(&t.name) {
                return Err(format_err(
                    path,
                    format!(
                        "tensor `{}` also appears in {}",
                        t.name,
                        self.files[*other].path.display()
                    ),
                ));
            }
            self.tensors.insert(t.name.clone(), (idx, t));
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map,
            data_start,
        });
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let (idx, info) = self.tensors.get(name)?;
        let f = &self.files[*idx];
        let start = f.data_start + info.offset;
        Some((info, &f.map[start..start + info.byte_len]))
    }

    /// Drops a tensor's pages from this process's resident memory once its bytes were
    /// copied: without it, a load holds the whole mapped file and the loaded weights at once,
    /// twice the weights' memory at its peak (measured: TinyLlama-shape Q4_0 1.24 GB, f16
    /// 4.3 GB). The pages stay in the page cache, reclaimable; reading the tensor again
    /// maps them back, so this is a hint, never a correctness matter.
    pub fn release(&self, name: &str) {
        let Some((idx, info)) = self.tensors.get(name) else {
            return;
        };
        let f = &self.files[*idx];
        #[cfg(unix)]
        // SAFETY: the map is read-only and private: dropping its pages loses nothing, the
        // next read faults them back in from the file. No reference into the range is used
        // after this; even one would read the same bytes again.
        unsafe {
            let _ = f.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                f.data_start + info.offset,
                info.byte_len,
            );
        }
        #[cfg(not(unix))]
        let _ = (f, info);
    }

    /// The file a tensor came from (for error messages).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|(i, _)| self.files[*i].path.as_path())
    }

    pub fn infos(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values().map(|(_, t)| t)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Opens and validates one safetensors file, adding its tensors.
    pub fn add_safetensors(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only map; see GgufFile::open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let (data_start, tensors) = parse_safetensors(&map).map_err(|m| format_err(path, m))?;
        self.add_file(path, map, data_start, tensors)
    }
}

/// The largest JSON header accepted (the format's own reference limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Parses and validates a safetensors header: returns the data start and the tensors.
pub fn parse_safetensors(buf: &[u8]) -> std::result::Result<(usize, Vec<TensorInfo>), String> {
    if buf.len() < 8 {
        return Err(format!(
            "truncated: {} bytes, a safetensors file needs an 8-byte header length",
            buf.len()
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(format!(
            "header length {n} exceeds the {MAX_HEADER}-byte limit"
        ));
    }
    if n > (buf.len() - 8) as u64 {
        return Err(format!(
            "header length {n} is larger than the file ({} bytes after the length)",
            buf.len() - 8
        ));
    }
    let data_start = 8 + n as usize;
    let header: serde_json::Value = serde_json::from_slice(&buf[8..data_start])
        .map_err(|e| format!("invalid JSON header: {e}"))?;
    let obj = header
        .as_object()
        .ok_or("the JSON header is not an object")?;
    let data_len = buf.len() - data_start;
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |m: &str| format!("tensor `{name}`: {m}");
        let dtype_name = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing `dtype`"))?;
        let format = match dtype_name {
            "U8" => TensorFormat::U8,
            "I8" => TensorFormat::I8,
            name => TensorFormat::Dense(DType::from_safetensors_name(name).ok_or_else(|| {
                bad(&format!(
                    "dtype {dtype_name} is not supported (F32, F16, BF16, and U8/I8 for quantized weights are)"
                ))
            })?),
        };
        let elem = match format {
            TensorFormat::Dense(d) => d.size(),
            _ => 1,
        };
        let dtype = format.name();
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing `shape`"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`shape` must be a list of non-negative integers"))?;
        let offsets: Vec<usize> = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad("`data_offsets` must be two non-negative integers"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        let byte_len = numel
            .checked_mul(elem)
            .ok_or_else(|| bad("shape overflows"))?;
        if end < begin || end - begin != byte_len {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}) hold {} bytes, shape {shape:?} of {dtype} needs {byte_len}",
                end.saturating_sub(begin)
            )));
        }
        if end > data_len {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}) lie outside the {data_len} data bytes (truncated file?)"
            )));
        }
        if begin % elem != 0 {
            return Err(bad(&format!(
                "data offset {begin} is not aligned to its {}-byte elements",
                elem
            )));
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            format,
            shape,
            offset: begin,
            byte_len,
        });
    }
    let mut spans: Vec<&TensorInfo> = tensors.iter().filter(|t| t.byte_len > 0).collect();
    spans.sort_by_key(|t| t.offset);
    for pair in spans.windows(2) {
        if pair[1].offset < pair[0].offset + pair[0].byte_len {
            return Err(format!(
                "tensors `{}` and `{}` overlap",
                pair[0].name, pair[1].name
            ));
        }
    }
    Ok((data_start, tensors))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Resident KiB of the mapping that holds `p` (its `Rss:` in /proc/self/smaps): this
    /// mapping only, whatever other tests map meanwhile.
    fn resident_kib(p: *const u8) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&(p as usize));
                    continue;
                }
            }
            if let Some(kib) = line.strip_prefix("Rss:").filter(|_| inside) {
                return kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {p:?}");
    }

    /// A released tensor leaves the process's resident memory, and reads back the same
    /// bytes after.
    #[test]
    fn released_tensors_leave_resident_memory_and_read_back_the_same() {
        let n = 8usize << 20; // f32 values: 32 MiB
        let header = format!(
            r#"{{"t":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
            4 * n
        );
        let data: Vec<u8> = (0..4 * n).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&data);
        let path =
            std::env::temp_dir().join(format!("vellum-release-{}.safetensors", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let mut store = TensorStore::default();
        store.add_safetensors(&path).unwrap();
        std::fs::remove_file(&path).unwrap();

        let (_, bytes) = store.get("t").unwrap();
        assert!(bytes == &data[..]);
        let before = resident_kib(bytes.as_ptr());
        store.release("t");
        let after = resident_kib(bytes.as_ptr());
        assert!(
            before >= 30 << 10 && after < 1 << 10,
            "resident {before} -> {after} KiB"
        );
        assert!(
            store.get("t").unwrap().1 == &data[..],
            "read back after release"
        );
        store.release("not there"); // no tensor of that name: nothing to do
    }
}
