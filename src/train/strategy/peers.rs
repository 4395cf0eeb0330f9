//! Data parallel on one machine (`--devices cpu,cpu`, `cuda:0,cuda:1`): one peer per device, each
//! a [`Trainer`] on its own thread with a replica of the encoder and its slice of every batch.
//! Rank 0 is the trainer the session drives; the strategy sends every other peer the same
//! commands (step, end of epoch, restore) and waits for them, so the run looks like one device to
//! everything else (checkpoints, metrics and the monitor are rank 0's, written once).
//!
//! Per step each peer forwards its slice, the embeddings are gathered so that every anchor sees
//! the whole global batch's negatives (`--gather-negatives`, the default), batch norms share
//! their statistics (SyncBN, `model::norm`), and the gradients are summed over the peers before
//! identical optimizer steps. On the CPU device this is the one-device step up to the order of
//! floating-point sums (`strategy::tests::two_peers_take_the_one_device_step`).

use crate::backend::DeviceSpec;
use crate::collective::{Collective, LeaveOnDrop, PeerStopped};
use crate::data::Split;
use crate::train::{RunConfig, Trainer};
use std::sync::mpsc::{channel, Receiver, Sender};

pub(super) enum Command {
    Step,
    EndEpoch,
    Restore {
        epoch: usize,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    },
    Load(Vec<u8>),
}

/// Rank 0's handle on one other peer.
pub(super) struct Peer {
    device: DeviceSpec,
    commands: Option<Sender<Command>>,
    replies: Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts a peer for each handle of `group` (ranks 1 and up) on its device of `config.devices`,
/// each with its own copy of `train`; returns once every one has made its replica.
pub(super) fn start(
    config: &RunConfig,
    train: &Split,
    group: Vec<Collective>,
) -> anyhow::Result<Vec<Peer>> {
    let peers: Vec<Peer> = group
        .into_iter()
        .map(|handle| {
            let device = config.devices[handle.rank()];
            let (commands, inbox) = channel();
            let (outbox, replies) = channel();
            let (config, train) = (config.clone(), train.clone());
            let thread = std::thread::Builder::new()
                .name(format!("dcl-peer-{}", handle.rank()))
                .spawn(move || serve(config, train, device, handle, inbox, outbox))?;
            Ok(Peer {
                device,
                commands: Some(commands),
                replies,
                thread: Some(thread),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    for (rank, peer) in peers.iter().enumerate() {
        peer.reply()
            .map_err(|e| anyhow::anyhow!("peer {} on {}: {e}", rank + 1, peer.device))?;
    }
    Ok(peers)
}

/// A peer's thread: make the replica, then answer commands until rank 0 hangs up.
fn serve(
    config: RunConfig,
    train: Split,
    device: DeviceSpec,
    handle: Collective,
    inbox: Receiver<Command>,
    outbox: Sender<Result<(), String>>,
) {
    let _leave = LeaveOnDrop(handle.clone());
    let made = crate::backend::device_at(device)
        .and_then(|device| Trainer::in_group(config, train, device, handle));
    let mut trainer = match made {
        Ok(trainer) => trainer,
        Err(e) => {
            let _ = outbox.send(Err(e.to_string()));
            return;
        }
    };
    let _ = outbox.send(Ok(()));
    for command in inbox {
        let done = match command {
            Command::Step => trainer.step().map(|_| ()),
            Command::EndEpoch => {
                trainer.end_epoch();
                Ok(())
            }
            Command::Restore {
                epoch,
                weights,
                optimizer,
            } => trainer.restore(epoch, weights, optimizer),
            Command::Load(weights) => trainer.load_weights(weights),
        };
        if outbox.send(done.map_err(|e| e.to_string())).is_err() {
            return;
        }
    }
}

impl Peer {
    fn send(&self, command: Command) -> anyhow::Result<()> {
        let sent = self.commands.as_ref().map(|c| c.send(command));
        anyhow::ensure!(
            matches!(sent, Some(Ok(()))),
            "the peer on {} has stopped",
            self.device
        );
        Ok(())
    }

    fn reply(&self) -> Result<(), String> {
        self.replies
            .recv()
            .unwrap_or_else(|_| Err("its thread ended without a word (a panic?)".into()))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for every peer's answer to the command all were sent. Rank 0's own outcome is `mine`;
/// when a peer failed, its error is the cause (rank 0 then only saw the group break up).
pub(super) fn settle<T>(peers: &[Peer], mine: anyhow::Result<T>) -> anyhow::Result<T> {
    let mut cause = None;
    for (rank, peer) in peers.iter().enumerate() {
        if let Err(e) = peer.reply() {
            cause.get_or_insert_with(|| {
                anyhow::anyhow!("peer {} on {}: {e}", rank + 1, peer.device)
            });
        }
    }
    match (mine, cause) {
        (Err(e), Some(cause)) if e.downcast_ref::<PeerStopped>().is_some() => Err(cause),
        (Ok(_), Some(cause)) => Err(cause),
        (mine, _) => mine,
    }
}

/// Every peer does `command` (rank 0 does its own share, if any, itself).
pub(super) fn tell_all(peers: &[Peer], command: impl Fn() -> Command) -> anyhow::Result<()> {
    send_all(peers, command)?;
    settle(peers, Ok(()))
}

/// Sends `command` to every peer; rank 0 then does its own share and calls [`settle`].
pub(super) fn send_all(peers: &[Peer], command: impl Fn() -> Command) -> anyhow::Result<()> {
    for peer in peers {
        peer.send(command())?;
    }
    Ok(())
}
