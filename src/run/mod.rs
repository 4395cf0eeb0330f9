//! A run folder on disk: `config.toml`, `metrics.jsonl`, `checkpoints/`, `model.safetensors`.
//! Checkpoints are whole folders renamed into place, and `checkpoints/latest` names the newest,
//! so a kill at any moment leaves the last good checkpoint readable. Each checkpoint's
//! `state.json` carries its files' CRC-32s: a damaged checkpoint is named and skipped for the one
//! before it.

#[cfg(not(target_arch = "wasm32"))]
mod train;

#[cfg(not(target_arch = "wasm32"))]
pub use train::train;

use crate::files::write_atomic;
use crate::train::RunConfig;
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub root: PathBuf,
}

/// What a checkpoint holds.
pub struct Checkpoint {
    pub epoch: usize,
    pub weights: Vec<u8>,
    pub optimizer: Vec<u8>,
}

impl RunDir {
    pub fn create(root: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(root.join("checkpoints"))
            .map_err(|e| anyhow::anyhow!("cannot create run folder {}: {e}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn open(root: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            root.join("config.toml").is_file(),
            "{} is not a run folder (no config.toml)",
            root.display()
        );
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn write_config(&self, config: &RunConfig) -> anyhow::Result<()> {
        write_atomic(
            &self.root.join("config.toml"),
            toml::to_string(config)?.as_bytes(),
        )
    }

    pub fn read_config(&self) -> anyhow::Result<RunConfig> {
        let path = self.root.join("config.toml");
        let text = fs::read_to_string(&path)?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// Appends one event as a JSON line.
    pub fn log(&self, event: &impl serde::Serialize) -> anyhow::Result<()> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics_path())?;
        writeln!(file, "{}", serde_json::to_string(event)?)?;
        Ok(())
    }

    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(self.metrics_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn clear_events(&self) -> anyhow::Result<()> {
        write_atomic(&self.metrics_path(), b"")
    }

    /// On resume from `epoch`, drops the events logged after that checkpoint (and any line a kill
    /// cut short), so the log reads as one uninterrupted run. Kept lines stay as written, byte
    /// for byte (a parse and re-serialization can move a float by one ulp).
    pub fn truncate_events_after(&self, epoch: usize) -> anyhow::Result<()> {
        let text = fs::read_to_string(self.metrics_path()).unwrap_or_default();
        let keep: Vec<&str> = text
            .lines()
            .filter(|line| {
                let Ok(e) = serde_json::from_str::<Value>(line) else {
                    return false;
                };
                // Events without an epoch (the raw-pixel baseline) come before any epoch's.
                let ep = e["epoch"].as_u64().unwrap_or(0) as usize;
                match e["event"].as_str() {
                    Some("step") => ep < epoch,
                    _ => ep <= epoch,
                }
            })
            .map(|line| line.trim_end())
            .collect();
        let mut kept = keep.join("\n");
        if !kept.is_empty() {
            kept.push('\n');
        }
        write_atomic(&self.metrics_path(), kept.as_bytes())
    }

    pub fn save_checkpoint(&self, ckpt: &Checkpoint) -> anyhow::Result<()> {
        let dir = self.root.join("checkpoints");
        let name = format!("epoch-{:04}", ckpt.epoch);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        fs::write(tmp.join("model.bin"), &ckpt.weights)?;
        fs::write(tmp.join("optimizer.bin"), &ckpt.optimizer)?;
        let state = serde_json::json!({
            "epoch": ckpt.epoch,
            "crc32": {
                "model.bin": crc32fast::hash(&ckpt.weights),
                "optimizer.bin": crc32fast::hash(&ckpt.optimizer),
            },
        });
        fs::write(tmp.join("state.json"), state.to_string())?;
        for f in ["model.bin", "optimizer.bin", "state.json"] {
            fs::File::open(tmp.join(f))?.sync_all()?;
        }
        let target = dir.join(&name);
        let _ = fs::remove_dir_all(&target);
        fs::rename(&tmp, &target)?;
        write_atomic(&dir.join("latest"), name.as_bytes())?;
        self.prune_checkpoints(&name)
    }

    /// Keeps the newest two checkpoints and removes leftovers of interrupted writes.
    fn prune_checkpoints(&self, newest: &str) -> anyhow::Result<()> {
        let dir = self.root.join("checkpoints");
        let mut names: Vec<String> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("epoch-") || n.starts_with(".epoch-"))
            .collect();
        names.sort();
        let keep: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("epoch-"))
            .rev()
            .take(2)
            .collect();
        for n in names
            .iter()
            .filter(|n| !keep.contains(n) && n.as_str() != newest)
        {
            let _ = fs::remove_dir_all(dir.join(n));
        }
        Ok(())
    }

    /// The newest checkpoint that reads back whole. One that does not (a file missing, a
    /// checksum that disagrees) is reported on stderr, by name, and the one before it is used;
    /// when none is whole, the error names the newest.
    pub fn latest_checkpoint(&self) -> anyhow::Result<Option<Checkpoint>> {
        let dir = self.root.join("checkpoints");
        let Ok(latest) = fs::read_to_string(dir.join("latest")) else {
            return Ok(None);
        };
        let latest = latest.trim().to_string();
        let mut older: Vec<String> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("epoch-") && n.as_str() < latest.as_str())
            .collect();
        older.sort();
        let mut first_error = None;
        for name in std::iter::once(latest).chain(older.into_iter().rev()) {
            match read_checkpoint(&dir.join(&name)) {
                Ok(ckpt) => return Ok(Some(ckpt)),
                Err(e) => {
                    eprintln!("{e}; trying the checkpoint before it");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("the loop saw the latest checkpoint"))
    }
}

/// One checkpoint folder, its files checked against the CRC-32s in its `state.json` (checkpoints
/// written before checksums existed have none to check).
fn read_checkpoint(ckpt: &Path) -> anyhow::Result<Checkpoint> {
    let read = |f: &str| {
        fs::read(ckpt.join(f))
            .map_err(|e| anyhow::anyhow!("checkpoint {}: {f}: {e}", ckpt.display()))
    };
    let state: Value = serde_json::from_slice(&read("state.json")?)
        .map_err(|e| anyhow::anyhow!("checkpoint {}: state.json: {e}", ckpt.display()))?;
    let epoch = state["epoch"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("checkpoint {}: state.json has no epoch", ckpt.display()))?;
    let checked = |f: &str| -> anyhow::Result<Vec<u8>> {
        let bytes = read(f)?;
        if let Some(expected) = state["crc32"][f].as_u64() {
            let actual = crc32fast::hash(&bytes);
            anyhow::ensure!(
                u64::from(actual) == expected,
                "checkpoint {} is damaged: {f} has CRC-32 {actual:08x}, state.json says {expected:08x}",
                ckpt.display()
            );
        }
        Ok(bytes)
    };
    Ok(Checkpoint {
        epoch: epoch as usize,
        weights: checked("model.bin")?,
        optimizer: checked("optimizer.bin")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(epoch: usize) -> Checkpoint {
        Checkpoint {
            epoch,
            weights: vec![epoch as u8; 64],
            optimizer: vec![7; 16],
        }
    }

    #[test]
    fn a_damaged_checkpoint_is_named_and_the_one_before_it_used() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        assert!(run.latest_checkpoint().unwrap().is_none());
        run.save_checkpoint(&checkpoint(1)).unwrap();
        run.save_checkpoint(&checkpoint(2)).unwrap();
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().epoch, 2);

        // One flipped byte in the newest weights: epoch 1 is used instead.
        let newest = tmp.path().join("checkpoints/epoch-0002/model.bin");
        let mut bytes = fs::read(&newest).unwrap();
        bytes[10] ^= 1;
        fs::write(&newest, bytes).unwrap();
        let ckpt = run.latest_checkpoint().unwrap().unwrap();
        assert_eq!((ckpt.epoch, ckpt.weights[0]), (1, 1));

        // Both damaged: the error names the newest and what is wrong with it.
        fs::remove_file(tmp.path().join("checkpoints/epoch-0001/optimizer.bin")).unwrap();
        let err = run.latest_checkpoint().err().unwrap().to_string();
        assert!(
            err.contains("epoch-0002") && err.contains("CRC-32"),
            "{err}"
        );
    }
}
