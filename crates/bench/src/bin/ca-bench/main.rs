//! `ca-bench`: certificates signed per second by `isthmus server` over gRPC/TLS, with the
//! in-process signing rate and openssl measured on the same CSRs in the same run. Loopback
//! only, bounded in count and time.
#![forbid(unsafe_code)]

mod config;
mod csr;
mod driver;
mod grpc;
mod inprocess;
mod loopback;
mod openssl;
mod report;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = config::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(driver::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
