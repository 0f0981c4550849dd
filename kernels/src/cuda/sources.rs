//! The CUDA C sources, embedded in the binary. Each `.cu` file is one NVRTC program (one
//! module on the GPU, one shared library under the emulator).

/// Headers every module may include, by the name they are included as.
pub const HEADERS: &[(&str, &str)] = &[
    ("vellum.cuh", include_str!("../../cuda/vellum.cuh")),
    ("emu.h", include_str!("../../cuda/emu.h")),
];

/// One `.cu` file.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// The file name without `.cu`, used to name the module at launch.
    pub name: &'static str,
    pub source: &'static str,
}

impl Module {
    pub fn file_name(&self) -> String {
        format!("{}.cu", self.name)
    }
}

pub const MODULES: &[Module] = &[
    Module {
        name: "elementwise",
        source: include_str!("../../cuda/elementwise.cu"),
    },
    Module {
        name: "norm",
        source: include_str!("../../cuda/norm.cu"),
    },
    Module {
        name: "attention",
        source: include_str!("../../cuda/attention.cu"),
    },
    Module {
        name: "matmul",
        source: include_str!("../../cuda/matmul.cu"),
    },
    Module {
        name: "qmatmul",
        source: include_str!("../../cuda/qmatmul.cu"),
    },
    Module {
        name: "qgemm",
        source: include_str!("../../cuda/qgemm.cu"),
    },
];

/// The module called `name`.
pub fn module(name: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.name == name)
}

/// The GPU architectures Vellum targets: T4, A100, A10/3090, Orin, L4, H100.
pub const TARGET_ARCHS: &[u32] = &[75, 80, 86, 87, 89, 90];

/// The newest of [`TARGET_ARCHS`]: what the emulator compiles for unless asked otherwise.
pub const NEWEST_ARCH: u32 = TARGET_ARCHS[TARGET_ARCHS.len() - 1];

/// A hash of everything that determines a module's compiled form except the compiler.
pub fn source_hash(m: &Module) -> u64 {
    let mut parts: Vec<&[u8]> = vec![m.name.as_bytes(), m.source.as_bytes()];
    for (name, text) in HEADERS {
        parts.push(name.as_bytes());
        parts.push(text.as_bytes());
    }
    super::stable_hash(&parts)
}
