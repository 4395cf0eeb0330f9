//! `dcl experiment`: runs that test the paper's claims on this machine's data.

mod npc;
mod sweep;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum ExperimentCommand {
    /// The NPC multiplier q per batch size and temperature: npc.md, npc.json, npc.svg.
    Npc(npc::NpcArgs),
    /// Losses against batch sizes with paired seeds: results.md, results.json, results.svg.
    BatchSweep(sweep::SweepArgs),
}

pub fn run(command: ExperimentCommand) -> anyhow::Result<()> {
    match command {
        ExperimentCommand::Npc(args) => npc::run(args),
        ExperimentCommand::BatchSweep(args) => sweep::run(args),
    }
}
