//! `smolvm network`: a sandbox's egress policy, and the `--egress` /
//! `--allow` flags of `create` and `run`.

use smolvm::config::EgressPolicy;
use smolvm::Sandbox;

/// What the guest may reach (shared by `create`, `run`, `network set`).
#[derive(clap::Args, Clone, Default)]
pub struct EgressFlags {
    /// What the guest may reach: open (anything but the host's own
    /// services; the default), off (nothing: no NIC at creation), or
    /// allowlist (only the --allow entries).
    #[arg(long, value_name = "MODE", value_parser = ["open", "off", "allowlist"])]
    pub egress: Option<String>,
    /// A name (`example.com`, `*.example.com` for the names below it) or an
    /// IPv4 address or CIDR (`192.0.2.0/24`) the guest may reach
    /// (repeatable; implies `--egress allowlist`).
    #[arg(long = "allow", value_name = "DOMAIN_OR_CIDR")]
    pub allow: Vec<String>,
}

impl EgressFlags {
    /// The policy these flags say (checked by the library: invalid entries
    /// are refused before anything is created).
    pub fn policy(&self) -> anyhow::Result<EgressPolicy> {
        match (self.egress.as_deref(), self.allow.is_empty()) {
            (None | Some("open"), true) => Ok(EgressPolicy::Open),
            (Some("off"), true) => Ok(EgressPolicy::Off),
            (None | Some("allowlist"), _) => {
                let (mut domains, mut cidrs) = (Vec::new(), Vec::new());
                for a in &self.allow {
                    if is_address(a) {
                        cidrs.push(a.clone());
                    } else {
                        domains.push(a.clone());
                    }
                }
                Ok(EgressPolicy::Allowlist { domains, cidrs })
            }
            (Some(m), false) => Err(anyhow::anyhow!(
                "--allow lists what an allowlist admits; it cannot go with --egress {m}"
            )),
            (Some(m), true) => Err(anyhow::anyhow!("unknown egress mode {m:?}")),
        }
    }
}

/// An address or network (`a.b.c.d`, `a.b.c.d/n`, IPv6 alike) rather than
/// a name.
fn is_address(s: &str) -> bool {
    let a = s.trim().split('/').next().unwrap_or("");
    a.parse::<std::net::IpAddr>().is_ok()
}

/// One line for people: `open`, `off`, `allowlist: a, b, 10.0.0.0/8`.
pub fn describe(p: &EgressPolicy) -> String {
    match p {
        EgressPolicy::Open => "open".into(),
        EgressPolicy::Off => "off".into(),
        EgressPolicy::Allowlist { domains, cidrs } => {
            let all: Vec<&str> = domains.iter().chain(cidrs).map(String::as_str).collect();
            format!("allowlist: {}", all.join(", "))
        }
    }
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NetworkArgs {
    #[command(subcommand)]
    cmd: Option<NetworkCommand>,
    /// Show this sandbox's egress policy.
    id: Option<String>,
    /// Print it as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum NetworkCommand {
    /// Replace the egress policy (the --allow entries are the whole new
    /// list). On a running sandbox at once (to allowlist or off, every open
    /// connection is cut); kept for later starts.
    Set {
        id: String,
        #[command(flatten)]
        egress: EgressFlags,
    },
}

pub async fn network(a: NetworkArgs) -> anyhow::Result<u8> {
    let (id, policy, json) = match a.cmd {
        Some(NetworkCommand::Set { id, egress }) => {
            if egress.egress.is_none() && egress.allow.is_empty() {
                anyhow::bail!("say what to set: --egress open|off|allowlist and/or --allow ENTRY");
            }
            let sbx = Sandbox::from_id(&id).await?;
            let p = sbx.set_egress(egress.policy()?).await?;
            (id, p, false)
        }
        None => {
            let Some(id) = a.id else {
                anyhow::bail!("usage: smolvm network ID, or smolvm network set ID --egress ...");
            };
            let p = Sandbox::from_id(&id).await?.egress().await?;
            (id, p, a.json)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&policy)?);
    } else {
        println!("{id}: egress {}", describe(&policy));
    }
    Ok(0)
}
