use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = enforcer::cli::Cli::parse();
    enforcer::cli::init_logging(cli.default_log_filter());
    match enforcer::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The causes in one line, never a backtrace: this is for people.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
