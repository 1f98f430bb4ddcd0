//! Sandbox configuration: strongly typed, validated before anything is
//! allocated.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Default image.
pub const DEFAULT_IMAGE: &str = "debian-12";
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default vCPUs.
pub const DEFAULT_CPUS: u32 = 1;
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 16384;
pub const MIN_CPUS: u32 = 1;
pub const MAX_CPUS: u32 = 32;
/// Longest VM name: `^[a-z0-9][a-z0-9_-]{0,62}$`.
pub const MAX_NAME_LEN: usize = 63;

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe boot proves it works, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    /// `SMOLVM_ACCEL` when set, else `Auto`.
    pub fn from_env() -> Result<Accel, ConfigError> {
        match std::env::var("SMOLVM_ACCEL") {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(Accel::Auto),
        }
    }
}

impl FromStr for Accel {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ConfigError::BadAccel(s.to_string())),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid VM name {0:?}: use 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit")]
    BadName(String),
    #[error("memory {0} MiB is out of range; use {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} MiB")]
    BadMemory(u32),
    #[error("{0} vCPUs is out of range; use {MIN_CPUS}-{MAX_CPUS}")]
    BadCpus(u32),
    #[error("disk size {0} MiB is out of range; use at most {MAX_DISK_MIB} MiB (16 TiB)")]
    BadDiskSize(u64),
    #[error("disk size {size} MiB is smaller than the image '{image}' ({min} MiB)")]
    DiskTooSmall { size: u64, min: u64, image: String },
    #[error("unknown backend {0:?}; use auto or qemu")]
    BadBackend(String),
    #[error("unknown accelerator {0:?}; use auto, kvm or tcg")]
    BadAccel(String),
    #[error(
        "invalid environment variable {0:?}: expected KEY=VALUE, KEY matching ^[A-Za-z_][A-Za-z0-9_]*$"
    )]
    BadEnv(String),
    #[error(
        "{vars} environment variables of {bytes} bytes are too many; a VM takes at most \
         {MAX_ENV_VARS} variables and {MAX_ENV_BYTES} bytes"
    )]
    EnvTooLarge { vars: usize, bytes: usize },
    /// An egress policy entry is unusable (the message names it and the fix).
    #[error("{0}")]
    BadEgress(String),
}

/// How a sandbox is built. Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// The VM's id; generated (`sbx-xxxxxxxx`) when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Image name (default `debian-12`).
    #[serde(default = "default_image")]
    pub image: String,
    /// Guest memory in MiB (default 512).
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// vCPUs (default 1).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Root disk size in MiB; the image's size when absent.
    #[serde(default)]
    pub disk_size_mib: Option<u64>,
    /// Accelerator (default auto, or `SMOLVM_ACCEL`).
    #[serde(default)]
    pub accel: Accel,
    /// Guest network (outbound access; never the host's own services, see
    /// docs/network.md). Default true.
    #[serde(default = "default_true")]
    pub network: bool,
    /// The VMM implementation (default QEMU).
    #[serde(default)]
    pub backend: crate::backend::BackendKind,
    /// Environment for every command run in this VM (a command's own
    /// variables win over these).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Always boot (never start from the shape's warm boot snapshot, and
    /// leave none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
    /// What the guest may reach (default open). `Off` means no NIC
    /// (`network: false`).
    #[serde(default, skip_serializing_if = "is_open")]
    pub egress: EgressPolicy,
    /// Host ports forwarded to the guest whenever it runs (`-p`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
    /// Start the guest's SSH server at every boot (else on first use).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh: bool,
}

pub use smolvm_proto::supervisor::{EgressPolicy, PortForward};

fn is_open(p: &EgressPolicy) -> bool {
    *p == EgressPolicy::Open
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}
fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}
fn default_cpus() -> u32 {
    DEFAULT_CPUS
}
fn default_true() -> bool {
    true
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            name: None,
            image: default_image(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            disk_size_mib: None,
            accel: Accel::Auto,
            network: true,
            backend: crate::backend::BackendKind::default(),
            env: BTreeMap::new(),
            cold: false,
            egress: EgressPolicy::Open,
            ports: Vec::new(),
            ssh: false,
        }
    }
}

impl SandboxConfig {
    /// Checks everything that can be checked without touching the disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::BadMemory(self.memory_mib));
        }
        if !(MIN_CPUS..=MAX_CPUS).contains(&self.cpus) {
            return Err(ConfigError::BadCpus(self.cpus));
        }
        if let Some(d) = self.disk_size_mib.filter(|d| *d > MAX_DISK_MIB) {
            return Err(ConfigError::BadDiskSize(d));
        }
        crate::egress::normalize(&self.egress)?;
        if !self.network && matches!(self.egress, EgressPolicy::Allowlist { .. }) {
            return Err(ConfigError::BadEgress(
                "an allowlist needs the guest network; drop `--no-network` (or use egress `off`)"
                    .into(),
            ));
        }
        validate_env(&self.env)
    }
}

/// Most VM-wide environment variables, and their bytes in all: they travel
/// with every command (one protocol frame).
pub const MAX_ENV_VARS: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 * 1024;

/// Keys match `^[A-Za-z_][A-Za-z0-9_]*$`; values hold no NUL.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (k, v) in env {
        if !valid_env_key(k) || v.contains('\0') {
            return Err(ConfigError::BadEnv(format!("{k}={v}")));
        }
    }
    let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if env.len() > MAX_ENV_VARS || bytes > MAX_ENV_BYTES {
        return Err(ConfigError::EnvTooLarge {
            vars: env.len(),
            bytes,
        });
    }
    Ok(())
}

/// Largest root disk (`--disk-size`), in MiB: 16 TiB, far inside what the
/// byte arithmetic and qcow2 can hold.
pub const MAX_DISK_MIB: u64 = 16 * 1024 * 1024;

/// `^[a-z0-9][a-z0-9_-]{0,62}$`
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName(name.to_string()))
    }
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`: a name every shell can use.
pub fn valid_env_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Parses `KEY=VALUE` (a VM-wide variable: the key rule of [`valid_env_key`]).
pub fn parse_env(s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('=') {
        Some((k, v)) if valid_env_key(k) && !v.contains('\0') => Ok((k.to_string(), v.to_string())),
        _ => Err(ConfigError::BadEnv(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_size_is_bounded() {
        let mut c = SandboxConfig {
            disk_size_mib: Some(u64::MAX / 1024),
            ..SandboxConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::BadDiskSize(u64::MAX / 1024)));
        c.disk_size_mib = Some(MAX_DISK_MIB);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn names() {
        for good in ["a", "0", "sbx-1", "my_vm", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "A",
            "Ab",
            "..",
            "a/b",
            "-a",
            "_a",
            "a.b",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits() {
        let mut c = SandboxConfig::default();
        assert!(c.validate().is_ok());
        c.memory_mib = 127;
        assert_eq!(c.validate(), Err(ConfigError::BadMemory(127)));
        c.memory_mib = 16385;
        assert!(c.validate().is_err());
        c.memory_mib = 16384;
        c.cpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::BadCpus(0)));
        c.cpus = 33;
        assert!(c.validate().is_err());
        c.cpus = 32;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_fields_rejected() {
        let r: Result<SandboxConfig, _> = serde_json::from_str(r#"{"memroy_mib": 5}"#);
        assert!(r.is_err());
        let c: SandboxConfig = serde_json::from_str(r#"{"cpus": 2}"#).unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory_mib, DEFAULT_MEMORY_MIB);
    }

    #[test]
    fn vm_env_is_bounded() {
        let mut c = SandboxConfig::default();
        c.env.insert("PATH".into(), "/x".into());
        assert!(c.validate().is_ok());
        c.env.insert("A=B".into(), "c".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadEnv(_))));
        c.env.clear();
        c.env.insert("K".into(), "a\0b".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadEnv(_))));
        c.env.clear();
        c.env.insert("BIG".into(), "x".repeat(MAX_ENV_BYTES));
        assert!(matches!(c.validate(), Err(ConfigError::EnvTooLarge { .. })));
        // An old config without the field still reads.
        let old: SandboxConfig = serde_json::from_str(r#"{"cpus": 1}"#).unwrap();
        assert!(old.env.is_empty());
    }

    #[test]
    fn env_and_accel() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("=x").is_err());
        for bad in ["1A=x", "A-B=x", "A B=x", "É=x", "A.B=x"] {
            assert!(parse_env(bad).is_err(), "{bad}");
        }
        assert!(parse_env("_a1=x").is_ok());
        assert!(parse_env("noequals").is_err());
        assert_eq!("TCG".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("hvf".parse::<Accel>().is_err());
    }
}
