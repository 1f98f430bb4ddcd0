//! `smolvm doctor`: renders the library's host diagnosis.

use smolvm::doctor::diagnose;

#[derive(clap::Args)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
}

pub async fn doctor(a: DoctorArgs) -> anyhow::Result<u8> {
    let checks = tokio::task::spawn_blocking(diagnose).await?;
    let all_ok = checks.iter().all(|c| c.ok);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{:<8} {:<20} {}", c.status.as_str(), c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("{:<8} {:<20} fix: {f}", "", "");
            }
        }
        println!(
            "{}",
            if all_ok {
                "\nall required host tools are present"
            } else {
                "\nsome requirements are missing (see fix lines)"
            }
        );
    }
    Ok(if all_ok { 0 } else { 1 })
}
