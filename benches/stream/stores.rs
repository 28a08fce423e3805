//! The `stores` section: the session paths again with coachd on real Redis and PostgreSQL +
//! pgvector (a scratch database, created and dropped here, and a fresh Redis key prefix), when
//! `DATABASE_URL` and `REDIS_URL` are set. Only the session paths: the stateless routes touch no
//! store.

use crate::BoxError;
use crate::coachd::{Placement, start_coachd};
use crate::fake::FakeProcess;
use crate::load::{Level, PathKind, Servers, run_levels};
use crate::report::{print_added, print_rows};

pub async fn run(fake: &mut FakeProcess, placement: Placement, levels: &[Level]) -> Result<(), BoxError> {
    let (Ok(db), Ok(redis)) = (std::env::var("DATABASE_URL"), std::env::var("REDIS_URL")) else {
        println!(
            "\n(stores: skipped; set DATABASE_URL and REDIS_URL, e.g. `set -a; . .services/env; set +a` after scripts/services)"
        );
        return Ok(());
    };
    // Real stores put a Redis read and a pgvector search on every turn's prompt, and write-behind
    // adds two appends and a memory insert after it. One and 100 streams: at 1 000, each turn's
    // HNSW insert (~10 ms of CPU) would need more than two cores.
    let levels: Vec<Level> = levels.iter().copied().filter(|l| l.streams <= 100).collect();
    let scratch = coachd::db::ScratchDatabase::create(&db, "coachd_bench_").await?;
    let prefix = format!("coachd_bench_{}:", uuid::Uuid::new_v4().simple());
    let env = [
        ("DATABASE_URL", scratch.url.clone()),
        ("REDIS_URL", redis),
        ("COACHD_REDIS_KEY_PREFIX", prefix),
    ];
    let result = async {
        let coachd = start_coachd(fake.base_url(), placement, &env).await?;
        let servers = Servers {
            coachd: &coachd,
            litellm: None,
        };
        let paths = [PathKind::Direct, PathKind::SessionSse, PathKind::WebSocket];
        run_levels(fake, servers, &levels, &paths).await
    }
    .await;
    // The scratch database goes whatever the run returned.
    scratch.drop_now().await?;
    let rows = result?;
    println!("\n## With Redis and PostgreSQL + pgvector behind coachd\n");
    print_rows(&rows);
    print_added(&rows);
    Ok(())
}
