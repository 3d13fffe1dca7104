//! `gpt2rs`: run GPT-2 checkpoints on this machine.

mod args;
mod bench;
mod commands;
mod device;
mod serve;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            std::process::exit(2);
        }
    }
    let result = match cli.command {
        args::Command::Generate(a) => commands::generate(a),
        args::Command::Score(a) => commands::score(a),
        args::Command::Info(a) => commands::info(a),
        args::Command::Quantize(a) => commands::quantize(a),
        args::Command::Bench(a) => commands::bench(a),
        args::Command::Serve(a) => serve::serve(a),
        args::Command::Loadtest(a) => serve::loadtest(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
