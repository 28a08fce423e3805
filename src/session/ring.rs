//! The replay ring of a session's event log: the last N events, with the token events of a
//! finished stretch of reply kept as their texts instead of as published events.
//!
//! A published token is a few bytes of text inside some 400 bytes of allocations (the shared
//! event, its serialised buffer and the buffer's header, the text), and tokens are nearly every
//! event a session logs. Live connections get the published event itself through their queues;
//! once the tokens of a reply are followed by another event (the turn's `turn_end`, as a rule)
//! only a client that resumes from before that point reads them again. So at that point the run
//! of tokens becomes one [`TokenRun`] (the texts end to end and where each ends), and a replay
//! serialises those tokens again, to the same bytes (`Published::with_envelope` is
//! deterministic). What a client sees does not change; what a session holds does: the profile of
//! 1 000 live WebSocket streams put a third of coachd's heap in logged events (BENCHMARKS.md).

use std::collections::VecDeque;
use std::sync::Arc;

use super::event::{EventBody, Published};

/// An event as published, or a run of tokens compacted (shared, so a replay takes it out of
/// the log's lock and serialises its tokens after, and with how many of its tokens are evicted).
#[derive(Debug)]
enum Entry {
    Event(Arc<Published>),
    Tokens(Arc<TokenRun>, usize),
}

/// Consecutive token events of one turn: seqs and indexes both one apart.
#[derive(Debug)]
struct TokenRun {
    /// Seq of the run's first token (`skip` of them may already be evicted).
    first_seq: u64,
    turn_number: u32,
    /// Index of the run's first token in its turn.
    first_index: u32,
    /// The tokens' texts, end to end.
    text: String,
    /// Where each token's text ends in `text`.
    ends: Vec<u32>,
}

impl TokenRun {
    /// Index in the run of the first token after seq `after`.
    fn first_after(&self, after: u64) -> usize {
        (after.saturating_add(1).saturating_sub(self.first_seq) as usize).min(self.ends.len())
    }

    /// The `i`th token of the run (counted from its first, evicted or not), published again.
    fn event(&self, envelope: &str, i: usize) -> Arc<Published> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends[i] as usize;
        let body = EventBody::Token {
            turn_number: self.turn_number,
            text: self.text[start..end].to_owned(),
            index: self.first_index + i as u32,
        };
        Arc::new(Published::with_envelope(
            envelope,
            self.first_seq + i as u64,
            body,
        ))
    }
}

/// The ring: at most `capacity` events, counting each token of a run.
#[derive(Debug)]
pub(super) struct Ring {
    entries: VecDeque<Entry>,
    /// Events held, runs counted by their tokens.
    held: usize,
    capacity: usize,
}

impl Ring {
    pub(super) fn new(capacity: usize) -> Self {
        Ring {
            entries: VecDeque::new(),
            held: 0,
            capacity: capacity.max(1),
        }
    }

    /// The seq of the oldest event held.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.entries.front().map(|e| match e {
            Entry::Event(event) => event.seq,
            Entry::Tokens(run, skip) => run.first_seq + *skip as u64,
        })
    }

    /// Logs an event, evicting the oldest past the capacity. An event other than a token first
    /// compacts the tokens just before it.
    pub(super) fn push(&mut self, event: Arc<Published>) {
        if !matches!(event.body, EventBody::Token { .. }) {
            self.compact_tail();
        }
        self.entries.push_back(Entry::Event(event));
        self.held += 1;
        while self.held > self.capacity {
            self.evict_one();
        }
    }

    fn evict_one(&mut self) {
        match self.entries.front_mut() {
            Some(Entry::Tokens(run, skip)) if run.ends.len() - *skip > 1 => *skip += 1,
            Some(_) => {
                self.entries.pop_front();
            }
            None => return,
        }
        self.held -= 1;
    }

    /// Turns the published tokens at the end of the ring into runs (one per stretch of
    /// consecutive seqs and indexes of one turn), oldest first.
    fn compact_tail(&mut self) {
        let mut from = self.entries.len();
        while from > 0
            && matches!(&self.entries[from - 1], Entry::Event(e) if matches!(e.body, EventBody::Token { .. }))
        {
            from -= 1;
        }
        if self.entries.len() - from < 2 {
            return;
        }
        let tail: Vec<Entry> = self.entries.drain(from..).collect();
        let mut run: Option<TokenRun> = None;
        for entry in tail {
            let Entry::Event(event) = entry else { continue };
            let EventBody::Token {
                turn_number,
                text,
                index,
            } = &event.body
            else {
                continue;
            };
            let follows = run.as_ref().is_some_and(|r| {
                r.turn_number == *turn_number
                    && r.first_seq + r.ends.len() as u64 == event.seq
                    && r.first_index as u64 + r.ends.len() as u64 == u64::from(*index)
            });
            // A text past u32 offsets starts a run of its own (a reply of 4 GiB is not a case).
            let fits = run
                .as_ref()
                .is_some_and(|r| r.text.len() + text.len() <= u32::MAX as usize);
            if !(follows && fits) {
                if let Some(done) = run.take() {
                    self.push_run(done);
                }
                run = Some(TokenRun {
                    first_seq: event.seq,
                    turn_number: *turn_number,
                    first_index: *index,
                    text: String::new(),
                    ends: Vec::new(),
                });
            }
            if let Some(r) = run.as_mut() {
                r.text.push_str(text);
                r.ends.push(r.text.len() as u32);
            }
        }
        if let Some(done) = run {
            self.push_run(done);
        }
    }

    fn push_run(&mut self, mut run: TokenRun) {
        run.text.shrink_to_fit();
        run.ends.shrink_to_fit();
        self.entries.push_back(Entry::Tokens(Arc::new(run), 0));
    }

    /// The events held after `after`, oldest first, at most `max`: cheap to take under the
    /// log's lock; [`Replay::publish`] serialises compacted tokens again, outside it.
    pub(super) fn after(&self, after: u64, max: usize) -> Replay {
        let mut pieces = Vec::new();
        let mut count = 0;
        for entry in &self.entries {
            if count >= max {
                break;
            }
            match entry {
                Entry::Event(event) if event.seq > after => {
                    pieces.push(Piece::Event(event.clone()));
                    count += 1;
                }
                Entry::Event(_) => {}
                Entry::Tokens(run, skip) => {
                    let from = run.first_after(after).max(*skip);
                    let to = run.ends.len().min(from.saturating_add(max - count));
                    if from < to {
                        pieces.push(Piece::Tokens(run.clone(), from..to));
                        count += to - from;
                    }
                }
            }
        }
        Replay { pieces, count }
    }
}

/// Logged events taken for a replay, not yet serialised.
#[derive(Debug, Default)]
pub(super) struct Replay {
    pieces: Vec<Piece>,
    count: usize,
}

#[derive(Debug)]
enum Piece {
    Event(Arc<Published>),
    Tokens(Arc<TokenRun>, std::ops::Range<usize>),
}

impl Replay {
    /// The events, compacted tokens published again with the session's `envelope`.
    pub(super) fn publish(self, envelope: &str) -> Vec<Arc<Published>> {
        let mut out = Vec::with_capacity(self.count);
        for piece in self.pieces {
            match piece {
                Piece::Event(event) => out.push(event),
                Piece::Tokens(run, range) => out.extend(range.map(|i| run.event(envelope, i))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::event::envelope;

    fn token(seq: u64, turn_number: u32, index: u32, text: &str) -> Arc<Published> {
        let body = EventBody::Token {
            turn_number,
            text: text.to_owned(),
            index,
        };
        Arc::new(Published::with_envelope(&envelope("s"), seq, body))
    }

    fn pong(seq: u64) -> Arc<Published> {
        Arc::new(Published::with_envelope(
            &envelope("s"),
            seq,
            EventBody::Pong { nonce: None },
        ))
    }

    /// A turn of `n` tokens from `seq`, then a non-token event: what a replay must give back.
    fn fill(ring: &mut Ring, seq: &mut u64, turn: u32, n: u32) -> Vec<Arc<Published>> {
        let mut pushed = Vec::new();
        for i in 0..n {
            *seq += 1;
            let event = token(*seq, turn, i, &format!("t{turn}.{i} \"é\" "));
            pushed.push(event.clone());
            ring.push(event);
        }
        *seq += 1;
        let end = pong(*seq);
        pushed.push(end.clone());
        ring.push(end);
        pushed
    }

    fn replay(ring: &Ring, after: u64, max: usize) -> Vec<Arc<Published>> {
        ring.after(after, max).publish(&envelope("s"))
    }

    fn bytes(events: &[Arc<Published>]) -> Vec<(u64, bytes::Bytes)> {
        events.iter().map(|e| (e.seq, e.sse.clone())).collect()
    }

    #[test]
    fn a_replay_of_compacted_tokens_is_byte_for_byte_what_was_published() {
        let mut ring = Ring::new(1_000);
        let mut seq = 0;
        let mut all = fill(&mut ring, &mut seq, 1, 20);
        all.extend(fill(&mut ring, &mut seq, 2, 7));
        assert!(
            ring.entries
                .iter()
                .filter(|e| matches!(e, Entry::Tokens(..)))
                .count()
                == 2,
            "both turns' tokens are compacted"
        );
        for after in [0, 1, 5, 20, 21, 22, 28, 29, 40] {
            let expected: Vec<_> = all.iter().filter(|e| e.seq > after).cloned().collect();
            assert_eq!(
                bytes(&replay(&ring, after, usize::MAX)),
                bytes(&expected),
                "after {after}"
            );
            assert_eq!(
                bytes(&replay(&ring, after, 3)),
                bytes(&expected[..expected.len().min(3)]),
                "at most 3 after {after}"
            );
        }
    }

    #[test]
    fn the_tokens_of_a_reply_still_streaming_stay_as_published() {
        let mut ring = Ring::new(100);
        let first = token(1, 1, 0, "a");
        ring.push(first.clone());
        ring.push(token(2, 1, 1, "b"));
        let replayed = replay(&ring, 0, 10);
        assert!(Arc::ptr_eq(&replayed[0], &first), "the same event, not a copy");
    }

    #[test]
    fn a_gap_in_seqs_or_indexes_or_a_new_turn_starts_another_run() {
        let mut ring = Ring::new(100);
        let events = [
            token(1, 1, 0, "a"),
            token(2, 1, 1, "b"),
            token(4, 1, 2, "c"),
            token(5, 1, 4, "d"),
            token(6, 2, 0, "e"),
            pong(7),
        ];
        for e in &events {
            ring.push(e.clone());
        }
        assert_eq!(bytes(&replay(&ring, 0, 100)), bytes(&events));
        let runs = ring
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Tokens(..)))
            .count();
        assert_eq!(runs, 4, "1-2, 4, 5 and turn 2's 6 are runs of their own");
    }

    #[test]
    fn eviction_counts_every_token_of_a_run_and_keeps_the_newest() {
        let mut ring = Ring::new(10);
        let mut seq = 0;
        let mut all = fill(&mut ring, &mut seq, 1, 8);
        all.extend(fill(&mut ring, &mut seq, 2, 8));
        assert_eq!(ring.held, 10);
        assert_eq!(ring.oldest(), Some(all[all.len() - 10].seq));
        assert_eq!(bytes(&replay(&ring, 0, 100)), bytes(&all[all.len() - 10..]));
    }
}
