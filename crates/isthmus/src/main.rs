//! `isthmus`: parses the command line and dispatches to the role it names.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use isthmus_cli::args::LogFormat;
use isthmus_cli::{Cli, Command};

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    match command {
        // Discovery, identity, DNS and the admin endpoints are light; the proxy runs on its
        // own runtime (`isthmus_agent::run`). One thread here keeps the agent small.
        Command::Agent(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime_for(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = match cli.command {
        Command::Server(args) => {
            init_logging(cli.global.log_format, &cli.global.log_level);
            runtime.block_on(isthmus_control_plane::server::run(
                *args,
                isthmus_control_plane::server::shutdown_signal(),
            ))
        }
        Command::Agent(args) => {
            init_logging(cli.global.log_format, &cli.global.log_level);
            runtime.block_on(isthmus_agent::run::run(
                *args,
                isthmus_control_plane::server::shutdown_signal(),
            ))
        }
        Command::Demo(args) => {
            init_logging(cli.global.log_format, &cli.global.log_level);
            runtime.block_on(isthmus_demo::run(
                *args,
                &mut std::io::stdout(),
                isthmus_control_plane::server::shutdown_signal(),
            ))
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "isthmus",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        cmd => runtime
            .block_on(isthmus_cli::commands::run(cmd, &mut std::io::stdout()))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
