//! The `hostile` section (issue 15, part 4; RELIABILITY.md): coachd's memory while hostile
//! clients come and go. A fresh coachd; then 10 000 connections opened and dropped in waves of
//! 500 (half with the start of a request head), then 2 000 slowloris connections held with half a
//! head until the header timeout closes them. RSS is read from `/proc` before, at the peak, and
//! after each phase, and once more after a pause: bounded memory is a peak that does not grow
//! with the number of clients and an end close to the start.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::BoxError;
use crate::coachd::{Placement, start_coachd};
use crate::fake::FakeProcess;
use crate::measure::rss_kib;

const HEADER_TIMEOUT_SECS: u64 = 3;

pub async fn run(fake: &FakeProcess, placement: Placement) -> Result<(), BoxError> {
    let coachd = start_coachd(
        fake.base_url(),
        placement,
        &[("COACHD_HTTP_HEADER_TIMEOUT_SECS", HEADER_TIMEOUT_SECS.to_string())],
    )
    .await?;
    let pid = coachd.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_kib(pid)?;
    let mut rows = Vec::new();

    // Phase 1: 10 000 connections opened and dropped.
    let mut peak = baseline;
    let began = Instant::now();
    let mut opened = 0;
    for _ in 0..20 {
        let mut wave = Vec::with_capacity(500);
        for i in 0..500 {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", coachd.port)).await else {
                continue;
            };
            if i % 2 == 0 {
                let _ = s.write_all(b"GET /health/live HTTP/1.1\r\nho").await;
            }
            opened += 1;
            wave.push(s);
        }
        peak = peak.max(rss_kib(pid)?);
        drop(wave);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    rows.push((
        format!(
            "{opened} connections opened and dropped in {:.1} s",
            began.elapsed().as_secs_f64()
        ),
        peak,
        rss_kib(pid)?,
    ));

    // Phase 2: 2 000 slowloris connections held until the server closes them.
    let mut held = Vec::with_capacity(2_000);
    for _ in 0..2_000 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", coachd.port)).await else {
            continue;
        };
        let _ = s
            .write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await;
        held.push(s);
    }
    let peak = rss_kib(pid)?;
    let began = Instant::now();
    let mut closed = 0;
    for s in &mut held {
        let mut buf = [0u8; 256];
        let deadline = Duration::from_secs(HEADER_TIMEOUT_SECS * 4);
        if let Ok(Ok(_) | Err(_)) = tokio::time::timeout(deadline, s.read(&mut buf)).await {
            closed += 1;
        }
    }
    rows.push((
        format!(
            "{} slowloris heads held: {closed} closed by the server within {:.1} s (timeout {HEADER_TIMEOUT_SECS} s)",
            held.len(),
            began.elapsed().as_secs_f64()
        ),
        peak,
        rss_kib(pid)?,
    ));
    drop(held);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let end = rss_kib(pid)?;

    println!("\n## Hostile clients: coachd's memory\n");
    println!(
        "baseline RSS {:.1} MiB; 5 s after the last phase {:.1} MiB\n",
        mib(baseline),
        mib(end)
    );
    println!("| phase | RSS peak MiB | RSS after MiB |");
    println!("|---|---:|---:|");
    for (what, peak, after) in rows {
        println!("| {what} | {:.1} | {:.1} |", mib(peak), mib(after));
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
