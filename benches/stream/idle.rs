//! The `idle` section: a fresh coachd holds many sessions, each with an idle WebSocket, and its
//! resident memory is read from `/proc` before and after.

use std::time::Duration;

use crate::BoxError;
use crate::clients::{create_session, ws_open};
use crate::coachd::{Placement, start_coachd};
use crate::fake::FakeProcess;
use crate::measure::rss_kib;

pub async fn run(fake: &FakeProcess, placement: Placement, sessions: usize) -> Result<(), BoxError> {
    // A fresh process, so earlier levels' allocations do not blur the figure.
    let coachd = start_coachd(fake.base_url(), placement, &[]).await?;
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(coachd.pid())?;
    let mut sockets = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let (id, token) = create_session(&client, &coachd.base, i).await?;
        sockets.push(ws_open(coachd.port, &id, &token).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(coachd.pid())?;
    let open = sockets.len();
    drop(sockets);
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / open.max(1) as f64;
    println!("\n## Idle WebSocket sessions\n");
    println!("| sessions | RSS before | RSS after | per session |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {open} | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per / 1024.0
    );
    Ok(())
}
