use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = enforcer::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.default_log_filter()))
                // It warns about every kernel attribute newer than itself; nothing to act on.
                .add_directive(
                    "netlink_packet_route=error"
                        .parse()
                        .expect("static directive"),
                ),
        )
        .with_writer(std::io::stderr)
        .init();
    enforcer::cli::run(cli)
}
