//! The CPU emulator behind [`KernelRuntime`]: each `.cu` module compiled by g++ against
//! `emu.h` into a shared library (cached on disk by source hash), loaded with libloading, and
//! launched through its `vellum_emu_<kernel>` entry with the same packed arguments a GPU gets.
//! Device memory is host memory; copies are checked against the allocation they touch, so a
//! host-code bug is an error here rather than memory corruption.

use super::runtime::{Arg, DeviceGraph, KernelRuntime, LaunchConfig, PackedArgs};
use super::sources::{self, Module, HEADERS};
use super::CudaError;
use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

type Result<T> = std::result::Result<T, CudaError>;

/// `dim3` as emu.h declares it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

type LaunchFn = unsafe extern "C" fn(Dim3, Dim3, u32, *mut *mut c_void) -> i32;

/// Launches share the emulator's per-process launch state (emu.h), so they run one at a time.
static LAUNCH_LOCK: Mutex<()> = Mutex::new(());
/// Builds write into the shared cache directory; one at a time per process (processes are
/// kept apart by their pid in the work directory name and the atomic rename).
static BUILD_LOCK: Mutex<()> = Mutex::new(());

const ALIGN: usize = 256;

/// What the emulator reports as its multiprocessor count: a small GPU, so that the tests'
/// small shapes are split along k as big shapes are on a real one.
const EMULATED_MULTIPROCESSORS: u32 = 8;

pub struct EmuRuntime {
    compiler: String,
    /// The architecture the kernels are compiled as (`VELLUM_EMU_ARCH`): the newest target
    /// unless `with_arch` asks for another, so that arch-specific code paths run here too.
    arch: u32,
    /// Allocation start -> size in bytes.
    allocs: Mutex<BTreeMap<u64, usize>>,
    /// While capturing: what was launched, in order, not yet run.
    capture: Mutex<Option<Vec<Recorded>>>,
}

/// One step of an emulated graph.
#[derive(Clone)]
enum Recorded {
    Launch {
        module: String,
        kernel: String,
        cfg: LaunchConfig,
        args: Vec<Arg>,
    },
    Zero {
        ptr: u64,
        bytes: usize,
    },
}

/// What an emulated capture recorded; `launch_graph` runs it in order.
struct EmuGraph {
    steps: Vec<Recorded>,
}

impl DeviceGraph for EmuGraph {
    fn launches(&self) -> usize {
        let launch = |r: &&Recorded| matches!(r, Recorded::Launch { .. });
        self.steps.iter().filter(launch).count()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl EmuRuntime {
    /// Checks that a C++ compiler (`$CXX`, else `g++`) is there; modules compile on first use,
    /// as for the newest target architecture.
    pub fn new() -> Result<Self> {
        Self::with_arch(sources::NEWEST_ARCH)
    }

    /// As `new`, with the kernels compiled as for `sm_{arch}` (one of
    /// [`sources::TARGET_ARCHS`]): sm_75 runs Turing's MMA shapes, for instance.
    pub fn with_arch(arch: u32) -> Result<Self> {
        if !sources::TARGET_ARCHS.contains(&arch) {
            return Err(CudaError::Emulator(format!(
                "sm_{arch} is not a target architecture ({:?})",
                sources::TARGET_ARCHS
            )));
        }
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let ok = Command::new(&compiler)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(CudaError::Emulator(format!(
                "no C++ compiler: `{compiler} --version` failed (set CXX)"
            )));
        }
        Ok(EmuRuntime {
            compiler,
            arch,
            allocs: Mutex::new(BTreeMap::new()),
            capture: Mutex::new(None),
        })
    }

    fn library(&self, name: &str) -> Result<Arc<libloading::Library>> {
        let module = sources::module(name)
            .ok_or_else(|| CudaError::Emulator(format!("no kernel module named {name}")))?;
        // Loaded libraries stay loaded for the life of the process (and are shared by every
        // runtime), so no launch can ever run code that was unloaded.
        type Libraries = HashMap<(&'static str, u32), Arc<libloading::Library>>;
        static LIBS: Mutex<Option<Libraries>> = Mutex::new(None);
        let mut libs = LIBS.lock().unwrap_or_else(|e| e.into_inner());
        let libs = libs.get_or_insert_with(HashMap::new);
        if let Some(lib) = libs.get(&(module.name, self.arch)) {
            return Ok(lib.clone());
        }
        let path = self.build(module)?;
        // SAFETY: the library is ours, built from our sources; its initialisers only set up
        // C++ statics.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| CudaError::Emulator(format!("loading {}: {e}", path.display())))?;
        let lib = Arc::new(lib);
        libs.insert((module.name, self.arch), lib.clone());
        Ok(lib)
    }

    /// Compiles `module` unless the cache already holds it; returns the library path.
    fn build(&self, module: &Module) -> Result<PathBuf> {
        let key = sources::source_hash(module) ^ super::stable_hash(&[self.compiler.as_bytes()]);
        let dir = super::cache_dir().join("emu");
        let lib = dir.join(format!("{}-sm{}-{key:016x}.so", module.name, self.arch));
        let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if lib.exists() {
            return Ok(lib);
        }
        let work = dir.join(format!(
            "build-{}-sm{}-{key:016x}-{}",
            module.name,
            self.arch,
            std::process::id()
        ));
        let io = |e: std::io::Error| CudaError::Emulator(format!("{}: {e}", work.display()));
        std::fs::create_dir_all(&work).map_err(io)?;
        for (name, text) in HEADERS {
            std::fs::write(work.join(name), text).map_err(io)?;
        }
        let src = work.join(module.file_name());
        std::fs::write(&src, module.source).map_err(io)?;
        let out = work.join("module.so");
        let result = compile(&self.compiler, self.arch, &src, &out);
        let moved = result.and_then(|()| std::fs::rename(&out, &lib).map_err(io));
        let _ = std::fs::remove_dir_all(&work);
        moved.map(|()| lib)
    }

    /// Records `step` if a capture is on (and says so), as CUDA's stream capture does.
    fn recorded(&self, step: impl FnOnce() -> Recorded) -> bool {
        let mut capture = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        match capture.as_mut() {
            Some(steps) => {
                steps.push(step());
                true
            }
            None => false,
        }
    }

    /// Host copies cannot be part of a graph: refused while capturing.
    fn refuse_while_capturing(&self, what: &str) -> Result<()> {
        match self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            true => Err(CudaError::Emulator(format!(
                "a {what} while capturing a graph: a recorded step's inputs must already be on \
                 the device"
            ))),
            false => Ok(()),
        }
    }

    fn check_range(&self, ptr: u64, len: usize, what: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        let inside = allocs
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&start, &size)| ptr + len as u64 <= start + size as u64);
        if inside {
            Ok(())
        } else {
            Err(CudaError::Memory(format!(
                "{what} of {len} bytes at {ptr:#x} is outside every allocation"
            )))
        }
    }
}

fn compile(compiler: &str, arch: u32, src: &Path, out: &Path) -> Result<()> {
    let output = Command::new(compiler)
        .args(["-std=c++20", "-O2", "-fPIC", "-shared", "-DVELLUM_EMU"])
        // In __CUDA_ARCH__'s numbering (750 for sm_75).
        .arg(format!("-DVELLUM_EMU_ARCH={}", arch * 10))
        // Each library keeps its own copy of emu.h's inline functions and launch state:
        // with default visibility, calls would bind to whichever library loaded first.
        .args(["-fvisibility=hidden", "-fvisibility-inlines-hidden"])
        .args(["-Wall", "-Wno-unknown-pragmas", "-Werror", "-x", "c++"])
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| CudaError::Emulator(format!("running {compiler}: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(CudaError::Emulator(format!(
            "{compiler} failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

impl KernelRuntime for EmuRuntime {
    fn name(&self) -> String {
        match self.arch {
            sources::NEWEST_ARCH => "cuda-emulator".into(),
            a => format!("cuda-emulator (sm_{a})"),
        }
    }

    fn multiprocessors(&self) -> u32 {
        EMULATED_MULTIPROCESSORS
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| CudaError::Memory(format!("{bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return Err(CudaError::Memory(format!(
                "out of memory allocating {bytes} bytes"
            )));
        }
        let mut allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        allocs.insert(p as u64, bytes);
        Ok(p as u64)
    }

    /// Filled with 0xFF bytes (NaN as f32) rather than left zeroed: an op that fails to
    /// write all of its output then shows in every emulated test.
    fn alloc_for_overwrite(&self, bytes: usize) -> Result<u64> {
        let ptr = self.alloc(bytes)?;
        // SAFETY: a live allocation of `bytes` bytes, just made.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xFF, bytes) };
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        let mut allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bytes) = allocs.remove(&ptr) {
            // The layout was valid at alloc time with the same size and alignment.
            let layout = Layout::from_size_align(bytes.max(1), ALIGN).expect("checked at alloc");
            // SAFETY: `ptr` came from alloc_zeroed with this layout and is freed once.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }

    fn zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.check_range(ptr, bytes, "memset")?;
        if self.recorded(|| Recorded::Zero { ptr, bytes }) {
            return Ok(());
        }
        // SAFETY: the range lies inside one live allocation.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(())
    }

    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.check_range(dst, src.len(), "host-to-device copy")?;
        self.refuse_while_capturing("host-to-device copy")?;
        // SAFETY: the destination range lies inside one live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.check_range(src, dst.len(), "device-to-host copy")?;
        self.refuse_while_capturing("device-to-host copy")?;
        // SAFETY: the source range lies inside one live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn launch(&self, module: &str, kernel: &str, cfg: &LaunchConfig, args: &[Arg]) -> Result<()> {
        let lib = self.library(module)?;
        let record = || Recorded::Launch {
            module: module.into(),
            kernel: kernel.into(),
            cfg: *cfg,
            args: args.to_vec(),
        };
        if self.recorded(record) {
            return Ok(());
        }
        let symbol = format!("vellum_emu_{kernel}");
        let err = |detail: String| CudaError::Launch {
            kernel: kernel.into(),
            detail,
        };
        // SAFETY: every vellum_emu_* symbol is defined by VELLUM_EXPORT with this signature.
        let f: libloading::Symbol<LaunchFn> = unsafe { lib.get(symbol.as_bytes()) }
            .map_err(|_| err(format!("not found in module {module}")))?;
        let dim = |(x, y, z): (u32, u32, u32)| Dim3 { x, y, z };
        let mut packed = PackedArgs::new(args);
        let mut ptrs = packed.pointers();
        let _guard = LAUNCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the argument array matches the kernel's parameters (the backend's host
        // code is the only caller, and the parity tests cover every launch).
        let rc = unsafe {
            f(
                dim(cfg.grid),
                dim(cfg.block),
                cfg.shared_bytes,
                ptrs.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(err(format!(
                "invalid configuration: grid {:?}, block {:?}",
                cfg.grid, cfg.block
            )));
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn begin_capture(&self) -> Result<()> {
        let mut capture = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        if capture.is_some() {
            return Err(CudaError::Emulator("a capture is already on".into()));
        }
        *capture = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn DeviceGraph>> {
        let steps = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let steps = steps.ok_or_else(|| CudaError::Emulator("no capture is on".into()))?;
        Ok(Box::new(EmuGraph { steps }))
    }

    fn launch_graph(&self, graph: &dyn DeviceGraph) -> Result<()> {
        let graph = graph
            .as_any()
            .downcast_ref::<EmuGraph>()
            .ok_or_else(|| CudaError::Emulator("not a graph of the emulator".into()))?;
        self.refuse_while_capturing("graph launch")?;
        for step in &graph.steps {
            match step {
                Recorded::Launch {
                    module,
                    kernel,
                    cfg,
                    args,
                } => self.launch(module, kernel, cfg, args)?,
                Recorded::Zero { ptr, bytes } => self.zero(*ptr, *bytes)?,
            }
        }
        Ok(())
    }
}

impl Drop for EmuRuntime {
    fn drop(&mut self) {
        let ptrs: Vec<u64> = self
            .allocs
            .lock()
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default();
        for p in ptrs {
            self.free(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(rt: &EmuRuntime, ptr: u64) -> Result<[f32; 4]> {
        let mut out = [0f32; 4];
        rt.dtoh(ptr, super::super::runtime::bytes_of_mut(&mut out))?;
        Ok(out)
    }

    /// As CUDA's stream capture: launches are recorded, not run; host copies are refused;
    /// each graph launch reruns the launches on the memory as it is then.
    #[test]
    fn a_capture_records_launches_that_each_graph_launch_runs() -> Result<()> {
        let rt = EmuRuntime::new()?;
        let (src, dst) = (rt.alloc(16)?, rt.alloc(16)?);
        let send = |v: [f32; 4]| rt.htod(src, super::super::runtime::bytes_of(&v));
        send([1.0, 2.0, 3.0, 4.0])?;
        rt.begin_capture()?;
        let args = [Arg::Ptr(src), Arg::Ptr(dst), Arg::U32(4)];
        rt.launch(
            "elementwise",
            "copy_f32",
            &LaunchConfig::linear(1, 256),
            &args,
        )?;
        assert!(send([9.0; 4]).is_err(), "a host copy while capturing");
        let graph = rt.end_capture()?;
        assert_eq!(graph.launches(), 1);
        assert_eq!(floats(&rt, dst)?, [0.0; 4], "nothing ran while capturing");
        rt.launch_graph(&*graph)?;
        assert_eq!(floats(&rt, dst)?, [1.0, 2.0, 3.0, 4.0]);
        send([5.0, 6.0, 7.0, 8.0])?;
        rt.launch_graph(&*graph)?;
        assert_eq!(
            floats(&rt, dst)?,
            [5.0, 6.0, 7.0, 8.0],
            "a replay's new input"
        );
        Ok(())
    }
}
