//! Kernel launches per training step on the CubeCL backends (wgpu, CUDA), counted from
//! CubeCL's own execution log: at its "minimal" profiling level the runtime writes one line per
//! kernel it launches, with no timing and so no synchronization. Every launch is a dispatch
//! with a fixed cost (25-70 microseconds each in a browser's WebGPU), which is why the page's
//! GPU step is counted before it is optimized.

use cubecl_runtime::config::profiling::ProfilingLogLevel;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
use std::path::PathBuf;
use std::time::Duration;

/// CubeCL's execution log, in a file of its own that goes when the log does.
pub struct LaunchLog {
    path: PathBuf,
}

impl LaunchLog {
    /// Turns the log on. CubeCL reads its configuration once, when the first device starts:
    /// call this before any. The rest of the configuration (a `cubecl.toml`, `CUBECL_*`
    /// variables: autotune, caches, other logs) is kept.
    pub fn start() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("dcl-launches-{}.log", std::process::id()));
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        let logger = &mut config.profiling.logger;
        logger.level = ProfilingLogLevel::Minimal;
        logger.file = Some(path.clone());
        (logger.append, logger.stdout, logger.stderr) = (false, false, false);
        anyhow::ensure!(
            CubeClRuntimeConfig::try_set(config),
            "CubeCL's configuration was read before the launch log could be set"
        );
        Ok(Self { path })
    }

    /// The launches logged so far. Call it with the device synchronized: every launch has then
    /// been submitted; the log's own thread is waited for until the count holds still.
    pub fn count(&self) -> usize {
        let read = || {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            text.lines().filter(|l| l.contains("Executing")).count()
        };
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            match read() {
                now if now == last => return now,
                now => last = now,
            }
        }
    }
}

impl Drop for LaunchLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
