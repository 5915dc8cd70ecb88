//! `mqplug new`: a plugin project that builds and passes the kit as written.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;

#[derive(Args)]
pub struct NewArgs {
    /// The plugin's name: lower-case letters, digits and '-'.
    pub name: String,
    /// rust, python, js or go.
    #[arg(long, default_value = "rust")]
    pub lang: crate::scaffold::Lang,
    /// The folder to write [default: ./NAME].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// mqplug's SDK for the language (plugins/sdk for Rust, plugins/go/sdk
    /// for Go, in a checkout of mqplug) [default: the checkout this mqplug
    /// was built from].
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

pub fn new_plugin(args: NewArgs) -> Result<std::process::ExitCode> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let sdk = match args.sdk {
        // Written into the project's Cargo.toml, which Cargo reads from the
        // project's folder: absolute, and checked now.
        Some(sdk) => {
            let sdk =
                std::path::absolute(&sdk).with_context(|| format!("--sdk {}", sdk.display()))?;
            let marker = crate::scaffold::sdk_marker(args.lang);
            ensure!(
                sdk.join(marker).is_file(),
                "--sdk {}: no {marker} there (give mqplug's plugins/sdk, or plugins/go/sdk for Go)",
                sdk.display()
            );
            Some(sdk)
        }
        None => crate::scaffold::default_sdk(args.lang),
    };
    let (files, commands) = crate::scaffold::write(&dir, &args.name, args.lang, sdk.as_deref())?;
    println!("wrote {} files in {}:", files.len(), dir.display());
    for file in files {
        println!("  {}", file.display());
    }
    println!("build and test it:\n  cd {}", dir.display());
    for command in commands {
        println!("  {command}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
