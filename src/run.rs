//! A run folder on disk: `config.toml`, `metrics.jsonl`, `checkpoints/`, `model.safetensors`.
//! Checkpoints are whole folders renamed into place, and `checkpoints/latest` names the newest,
//! so a kill at any moment leaves the last good checkpoint readable.

use crate::train::RunConfig;
use crate::weights::write_atomic;
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
    /// cut short), so the log reads as one uninterrupted run.
    pub fn truncate_events_after(&self, epoch: usize) -> anyhow::Result<()> {
        let keep: Vec<String> = self
            .events()
            .into_iter()
            .filter(|e| {
                // Events without an epoch (the raw-pixel baseline) come before any epoch's.
                let ep = e["epoch"].as_u64().unwrap_or(0) as usize;
                match e["event"].as_str() {
                    Some("step") => ep < epoch,
                    _ => ep <= epoch,
                }
            })
            .map(|e| e.to_string() + "\n")
            .collect();
        write_atomic(&self.metrics_path(), keep.concat().as_bytes())
    }

    pub fn save_checkpoint(&self, ckpt: &Checkpoint) -> anyhow::Result<()> {
        let dir = self.root.join("checkpoints");
        let name = format!("epoch-{:04}", ckpt.epoch);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        fs::write(tmp.join("model.bin"), &ckpt.weights)?;
        fs::write(tmp.join("optimizer.bin"), &ckpt.optimizer)?;
        fs::write(
            tmp.join("state.json"),
            serde_json::json!({ "epoch": ckpt.epoch }).to_string(),
        )?;
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

    pub fn latest_checkpoint(&self) -> anyhow::Result<Option<Checkpoint>> {
        let dir = self.root.join("checkpoints");
        let Ok(name) = fs::read_to_string(dir.join("latest")) else {
            return Ok(None);
        };
        let ckpt = dir.join(name.trim());
        let read = |f: &str| {
            fs::read(ckpt.join(f))
                .map_err(|e| anyhow::anyhow!("checkpoint {}: {f}: {e}", ckpt.display()))
        };
        let state: Value = serde_json::from_slice(&read("state.json")?)?;
        let epoch = state["epoch"].as_u64().ok_or_else(|| {
            anyhow::anyhow!("checkpoint {}: state.json has no epoch", ckpt.display())
        })?;
        Ok(Some(Checkpoint {
            epoch: epoch as usize,
            weights: read("model.bin")?,
            optimizer: read("optimizer.bin")?,
        }))
    }
}
