//! `smolvm env`: a sandbox's persistent environment.

use smolvm::Sandbox;

#[derive(clap::Subcommand)]
pub enum EnvCommand {
    /// Set variables (merged into the others) for every later command.
    Set {
        id: String,
        /// KEY=VALUE, KEY matching ^[A-Za-z_][A-Za-z0-9_]*$.
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = super::parse_env)]
        vars: Vec<(String, String)>,
        /// Replace all variables instead of merging.
        #[arg(long)]
        replace: bool,
    },
    /// Remove variables.
    Unset {
        id: String,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// List the variables.
    Ls {
        id: String,
        /// Print them as a JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub async fn env(c: EnvCommand) -> anyhow::Result<u8> {
    match c {
        EnvCommand::Set { id, vars, replace } => {
            let sbx = Sandbox::from_id(&id).await?;
            sbx.set_env(vars.into_iter().collect(), !replace).await?;
        }
        EnvCommand::Unset { id, keys } => {
            let sbx = Sandbox::from_id(&id).await?;
            sbx.unset_env(keys).await?;
        }
        EnvCommand::Ls { id, json } => {
            let sbx = Sandbox::from_id(&id).await?;
            let env = sbx.env().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&env)?);
            } else {
                for (k, v) in env {
                    // Values are the user's, but may hold control characters.
                    println!("{k}={}", smolvm::text::escape_line(&v));
                }
            }
        }
    }
    Ok(0)
}
