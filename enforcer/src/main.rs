use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = enforcer::cli::Cli::parse();
    enforcer::cli::init_logging(cli.default_log_filter());
    enforcer::cli::run(cli)
}
