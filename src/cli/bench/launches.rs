//! Kernel launches per training step on the CubeCL backends (wgpu, CUDA), counted from
//! CubeCL's own execution log: at its "minimal" profiling level the runtime writes one line per
//! kernel it launches, with no timing and so no synchronization. Every launch is a dispatch
//! with a fixed cost (25-70 microseconds each in a browser's WebGPU), which is why the page's
//! GPU step is counted before it is optimized. At its "basic" level each line also carries the
//! kernel's time on the device (each launch then timed on its own, which slows the step: the
//! times say where a step goes, not how fast it is).

use super::KernelTime;
use cubecl_runtime::config::profiling::ProfilingLogLevel;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// CubeCL's execution log, in a file of its own that goes when the log does.
pub struct LaunchLog {
    path: PathBuf,
}

impl LaunchLog {
    /// Turns the log on, with each launch's device time when `timed`. CubeCL reads its
    /// configuration once, when the first device starts: call this before any. The rest of the
    /// configuration (a `cubecl.toml`, `CUBECL_*` variables: autotune, caches, other logs) is
    /// kept.
    pub fn start(timed: bool) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("dcl-launches-{}.log", std::process::id()));
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        let logger = &mut config.profiling.logger;
        logger.level = match timed {
            true => ProfilingLogLevel::Basic,
            false => ProfilingLogLevel::Minimal,
        };
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
        let mut last = self.launches().len();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            match self.launches().len() {
                now if now == last => return now,
                now => last = now,
            }
        }
    }

    /// The kernels launched after the first `skip` launches, the slowest first (with times only
    /// when the log was started `timed`).
    pub fn kernel_times(&self, skip: usize) -> Vec<KernelTime> {
        let mut kernels: HashMap<String, KernelTime> = HashMap::new();
        for (ms, kernel) in self.launches().into_iter().skip(skip) {
            let entry = kernels.entry(kernel.clone()).or_insert(KernelTime {
                kernel,
                launches: 0,
                ms: 0.0,
            });
            entry.launches += 1;
            entry.ms += ms;
        }
        let mut kernels: Vec<KernelTime> = kernels.into_values().collect();
        kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(b.launches.cmp(&a.launches)));
        kernels
    }

    /// Each launch as (device ms, kernel name): `Executing NAME` untimed, `| DURATION | NAME`
    /// timed (the duration in Rust's `Debug` form: `1.234ms`, `56.7µs`).
    fn launches(&self) -> Vec<(f64, String)> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                if let Some(name) = line.strip_prefix("Executing ") {
                    return Some((0.0, name.to_string()));
                }
                let (duration, name) = line.strip_prefix("| ")?.split_once(" | ")?;
                Some((milliseconds(duration.trim())?, name.trim().to_string()))
            })
            .collect()
    }
}

/// A `Duration`'s `Debug` text in milliseconds.
fn milliseconds(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (value, unit) = text.split_at(split);
    let scale = match unit {
        "s" => 1e3,
        "ms" => 1.0,
        "µs" => 1e-3,
        "ns" => 1e-6,
        _ => return None,
    };
    Some(value.parse::<f64>().ok()? * scale)
}

impl Drop for LaunchLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::milliseconds;
    use std::time::Duration;

    #[test]
    fn reads_durations_as_debug_prints_them() {
        for micros in [0u64, 7, 999, 1_500, 2_000_000, 3_250_000] {
            let d = Duration::from_micros(micros);
            let ms = milliseconds(&format!("{d:?}")).expect("parsed");
            assert!((ms - micros as f64 / 1e3).abs() < 1e-9, "{d:?} -> {ms}");
        }
        assert_eq!(milliseconds("12 parsecs"), None);
    }
}
