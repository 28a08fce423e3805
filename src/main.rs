//! The `coachd` binary: `coachd serve` (default) runs the server (with job workers unless
//! `COACHD_JOBS_WORKERS=false`), `coachd worker [--queues q1,q2]` runs job workers only (and the
//! health routes), `coachd migrate` applies the database migrations and exits, `coachd memory
//! reembed` moves every stored memory to the configured embedder, `coachd healthcheck` asks the
//! local server's `/health/live` (the container health check). All the work is in the library.

use std::process::ExitCode;

use coachd::config::{Settings, load_dotenv};
use coachd::startup::{Application, StartupError, shutdown_signal};
use coachd::{db, telemetry};

// glibc's malloc showed up as ~10% of the CPU profile of a streaming session (many small, short
// lived allocations per token across two worker threads); mimalloc's thread-local free lists fit
// that pattern. See BENCHMARKS.md. The `system-alloc` feature leaves it out for heap profiles.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: coachd [serve | worker [--queues q1,q2] | migrate | memory reembed [--batch N] | healthcheck | help | version]\n\n  serve    run the server (default), with job workers unless COACHD_JOBS_WORKERS=false\n  worker   run job workers only (queues: extraction, transcription, llm; default all or\n           COACHD_JOBS_QUEUES), serving the health routes on PORT\n  migrate  apply database migrations to DATABASE_URL and exit\n  memory reembed [--batch N]\n           re-embed every memory with the configured embedder (after a change of\n           COACHD_EMBEDDING_PROVIDER, _MODEL or _DIM), N per batch (default\n           COACHD_EMBEDDING_BATCH_SIZE); resumable, stop the servers first\n  healthcheck  exit 0 when the server on PORT answers /health/live (for container health checks)\n\nSettings come from the environment and a .env file; see .env.example.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().cloned().unwrap_or_else(|| "serve".to_owned());
    let mut queues = None;
    let mut reembed_batch = None;
    match command.as_str() {
        "serve" | "migrate" if args.len() <= 1 => {}
        "memory" => match reembed_args(&args[1..]) {
            Ok(batch) => reembed_batch = batch,
            Err(e) => {
                eprintln!("coachd: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        "worker" => match worker_queues(&args[1..]) {
            Ok(q) => queues = q,
            Err(e) => {
                eprintln!("coachd: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        // Hidden: one document parse in a child process (see `extract`); no settings, no runtime.
        coachd::extract::CHILD_COMMAND => return coachd::extract::run_child(std::env::args().skip(2)),
        "healthcheck" if args.len() == 1 => return healthcheck(),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "version" | "-V" | "--version" => {
            println!("coachd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("coachd: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    }

    if let Err(e) = load_dotenv() {
        eprintln!("coachd: {e}");
        return ExitCode::from(2);
    }
    let settings = match Settings::from_env() {
        Ok(mut s) => {
            if command == "worker" {
                s.jobs.run_workers = true;
                s.jobs.serve_api = false;
                if let Some(q) = queues {
                    s.jobs.queues = q;
                }
            }
            s
        }
        Err(e) => {
            eprintln!("coachd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init(&settings) {
        eprintln!("coachd: {e}");
        return ExitCode::from(2);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coachd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if command == "migrate" {
            migrate(settings).await
        } else if command == "memory" {
            reembed(settings, reembed_batch).await
        } else {
            serve(settings).await
        }
    });
    // A no-op after a normal stop (the server flushed the traces last); here for the failures.
    telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "coachd failed");
            eprintln!("coachd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `coachd healthcheck`: the server on `PORT` (default 8000) at `COACHD_HOST`, or at 127.0.0.1
/// when it listens on every address, answers `/health/live` within 3 s. Reads only those two
/// variables, so it works in the same environment as the server without starting anything.
fn healthcheck() -> ExitCode {
    let port = match std::env::var("PORT").ok().filter(|p| !p.trim().is_empty()) {
        None => 8000,
        Some(p) => match p.trim().parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                eprintln!("coachd healthcheck: PORT must name the server's port (got {p:?})");
                return ExitCode::from(2);
            }
        },
    };
    let host = std::env::var("COACHD_HOST")
        .ok()
        .and_then(|h| h.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    match coachd::health::probe_live((host, port).into(), std::time::Duration::from_secs(3)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coachd healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The queues of `coachd worker --queues a,b` (or `--queues=a,b`); `None` without the flag.
fn worker_queues(args: &[String]) -> Result<Option<Vec<coachd::jobs::Queue>>, String> {
    match args {
        [] => Ok(None),
        [flag, list] if flag == "--queues" => coachd::config::parse_queues(list).map(Some),
        [flag] if flag.starts_with("--queues=") => {
            coachd::config::parse_queues(&flag["--queues=".len()..]).map(Some)
        }
        _ => Err(format!("unexpected arguments to worker: {}", args.join(" "))),
    }
}

/// `memory reembed [--batch N]`: the batch size, `None` for the default.
fn reembed_args(args: &[String]) -> Result<Option<usize>, String> {
    let batch = |n: &str| match n.parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(Some(n)),
        _ => Err(format!("--batch takes a number from 1 to 100000, not {n:?}")),
    };
    match args {
        [sub] if sub == "reembed" => Ok(None),
        [sub, flag, n] if sub == "reembed" && flag == "--batch" => batch(n),
        [sub, flag] if sub == "reembed" && flag.starts_with("--batch=") => batch(&flag["--batch=".len()..]),
        _ => Err(format!("unexpected arguments to memory: {}", args.join(" "))),
    }
}

async fn reembed(settings: Settings, batch: Option<usize>) -> anyhow::Result<()> {
    let url = settings.database_url.clone().ok_or(StartupError::NoDatabase)?;
    // No fallback: re-embedding into feature hashing because the model files are missing would
    // be the opposite of what the operator asked for.
    let embedder =
        coachd::embed::from_settings(&settings.embedding, settings.llm.llm_timeouts.connect, false)?;
    let pool = db::connect(&url, &settings).await?;
    db::migrate(&pool).await?;
    let batch = batch.unwrap_or(settings.embedding.batch_size);
    eprintln!(
        "coachd: re-embedding memories with {} ({} dimensions), {batch} per batch",
        embedder.model(),
        embedder.dimension()
    );
    let outcome = coachd::memory::pg::reembed(&pool, embedder, &settings.memory, batch, |p| {
        eprintln!("coachd: re-embedded {}/{} memories", p.done, p.total);
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    pool.close().await;
    match outcome {
        coachd::memory::pg::ReembedOutcome::UpToDate => {
            println!("coachd: the memory database already holds this embedder's vectors")
        }
        coachd::memory::pg::ReembedOutcome::Finished { reembedded } => {
            println!("coachd: re-embed finished ({reembedded} memories re-embedded by this run)")
        }
        coachd::memory::pg::ReembedOutcome::Stopped { reembedded } => {
            println!("coachd: re-embed stopped after {reembedded} memories; run it again to resume")
        }
    }
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    app.run(shutdown_signal()).await
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    let url = settings.database_url.clone().ok_or(StartupError::NoDatabase)?;
    let pool = db::connect(&url, &settings).await?;
    let applied = db::migrate(&pool).await?;
    pool.close().await;
    println!("coachd: migrations up to date ({applied} applied now)");
    Ok(())
}
