//! NVRTC: the embedded `.cu` sources compiled to CUBIN for one architecture at run time, with
//! an on-disk cache keyed by source hash, architecture and NVRTC version. NVRTC is loaded
//! dynamically (cudarc); its absence is an error, never a panic.

use super::sources::{self, Module, HEADERS};
use super::CudaError;
use cudarc::nvrtc::sys;
use std::ffi::{c_char, CString};

type Result<T> = std::result::Result<T, CudaError>;

/// Whether libnvrtc can be loaded (from the library path: the CUDA toolkit, or the
/// `nvidia-cuda-nvrtc` wheel's lib directory on `LD_LIBRARY_PATH`).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen candidate names.
    unsafe { sys::is_culib_present() }
}

fn ensure_available() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(CudaError::Unavailable(
            "libnvrtc not found on the library path (install the CUDA toolkit or the \
             nvidia-cuda-nvrtc wheel and add its lib directory to LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

fn call(what: &'static str, r: sys::nvrtcResult) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver {
            call: what,
            detail: format!("{r:?}"),
        })
    }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    ensure_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; both pointers are valid.
    call("nvrtcVersion", unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// The result of one compilation: the CUBIN and NVRTC's log (warnings live there).
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Compile options: fixed, part of the cache key.
fn options(arch: u32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
    ]
}

/// Compiles `module` for `sm_<arch>`. A compile error carries NVRTC's log, whose lines name
/// the file and line (`norm.cu(12): error: ...`).
pub fn compile(module: &Module, arch: u32) -> Result<Compiled> {
    ensure_available()?;
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| CudaError::Unavailable(format!("NUL byte in {s:.40}")))
    };
    let src = cstr(module.source)?;
    let name = cstr(&module.file_name())?;
    let header_text: Vec<CString> = HEADERS
        .iter()
        .map(|(_, t)| cstr(t))
        .collect::<Result<_>>()?;
    let header_names: Vec<CString> = HEADERS
        .iter()
        .map(|(n, _)| cstr(n))
        .collect::<Result<_>>()?;
    let text_ptrs: Vec<*const c_char> = header_text.iter().map(|c| c.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = options(arch)
        .iter()
        .map(|o| cstr(o))
        .collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string alive until the program is
    // destroyed below.
    unsafe {
        call(
            "nvrtcCreateProgram",
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                HEADERS.len() as i32,
                text_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
            ),
        )?;
    }
    // SAFETY: `prog` is a live program; it is destroyed exactly once, here.
    let result = unsafe { compile_program(prog, &opt_ptrs) };
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    let (ok, log, cubin) = result?;
    if !ok {
        return Err(CudaError::Compile {
            file: module.file_name(),
            arch,
            log,
        });
    }
    Ok(Compiled { cubin, log })
}

/// Compiles a created program; returns (success, log, cubin).
unsafe fn compile_program(
    prog: sys::nvrtcProgram,
    opts: &[*const c_char],
) -> Result<(bool, String, Vec<u8>)> {
    let rc = sys::nvrtcCompileProgram(prog, opts.len() as i32, opts.as_ptr());
    let mut log_len = 0usize;
    call(
        "nvrtcGetProgramLogSize",
        sys::nvrtcGetProgramLogSize(prog, &mut log_len),
    )?;
    let mut log = vec![0u8; log_len.max(1)];
    call(
        "nvrtcGetProgramLog",
        sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char),
    )?;
    let log = String::from_utf8_lossy(&log)
        .trim_end_matches('\0')
        .trim()
        .to_string();
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok((false, log, Vec::new()));
    }
    let mut size = 0usize;
    call("nvrtcGetCUBINSize", sys::nvrtcGetCUBINSize(prog, &mut size))?;
    let mut cubin = vec![0u8; size];
    call(
        "nvrtcGetCUBIN",
        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char),
    )?;
    Ok((true, log, cubin))
}

/// [`compile`] through the on-disk cache (`<cache>/cubin/<module>-sm<arch>-<key>.cubin`). A
/// cache that cannot be written only costs the next start a compile.
pub fn compile_cached(module: &Module, arch: u32) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let opts = options(arch).join(" ");
    let key = sources::source_hash(module)
        ^ super::stable_hash(&[format!("{major}.{minor} {opts}").as_bytes()]);
    let path = super::cache_dir()
        .join("cubin")
        .join(format!("{}-sm{arch}-{key:016x}.cubin", module.name));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let compiled = compile(module, arch)?;
    if let Err(e) = super::write_atomically(&path, &compiled.cubin) {
        tracing::warn!("could not cache {}: {e}", path.display());
    }
    Ok(compiled.cubin)
}
