//! `inspector adapter …`

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Merge a LoRA adapter into its base model and write a complete Hugging Face model
    /// directory (config, sharded safetensors with the base's key names, tokenizer and
    /// processor files copied) that transformers and inspector both load.
    Merge {
        /// The base model directory.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long, value_name = "DIR")]
        adapter: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub fn run(cmd: AdapterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdapterCommand::Merge {
            model,
            adapter,
            out,
        } => {
            anyhow::ensure!(
                out.canonicalize().ok() != model.canonicalize().ok(),
                "--out must not be the base model's directory"
            );
            let merged = inspector_qwen2vl::adapter::merge(&model, &adapter, &out)?;
            println!(
                "merged {} layers → {} ({} files)",
                merged.merged_layers,
                out.display(),
                merged.files.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
