//! `ringbd generate`: man pages and shell completions made from the
//! command-line definitions themselves (clap_mangen, clap_complete), so a
//! package ships documentation that cannot drift from the flags.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Write ringbd.1 and one ringbd-SUBCOMMAND.1 per subcommand into DIR (for packages).
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub fn run(a: GenerateArgs, mut cmd: clap::Command) -> ExitCode {
    let r = match a.what {
        What::Man { dir } => man(&mut cmd, &dir),
        What::Completions { shell } => {
            let name = cmd.get_name().to_owned();
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            Ok(())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringbd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn man(cmd: &mut clap::Command, dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    cmd.build();
    let write = |page: clap::Command, file: String| -> Result<(), String> {
        let path = dir.join(&file);
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out).map_err(|e| format!("rendering {file}: {e}"))?;
        std::fs::write(&path, out).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    write(cmd.clone(), "ringbd.1".to_owned())?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("ringbd-{}", sub.get_name());
        write(sub.clone().name(name.clone()), format!("{name}.1"))?;
    }
    Ok(())
}
