use clap::Parser;

fn main() {
    dcl::alloc::keep_freed_memory();
    let cli = dcl::cli::Cli::parse();
    if let Err(e) = dcl::cli::run(cli) {
        // One line that names the problem; exit code 2 marks bad input or a failed run.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(2);
    }
}
