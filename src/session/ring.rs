//! The replay ring of a session's event log: the last N events, with the token events of a
//! reply kept as their texts instead of as published events, but for the newest few.
//!
//! A published token is a few bytes of text inside some 400 bytes of allocations (the shared
//! event, its serialised buffer and the buffer's header, the text), and tokens are nearly every
//! event a session logs. Live connections get the published event itself through their queues;
//! once they have it, only a client that resumes from before it reads it again. So the ring keeps
//! a reply's tokens as one [`TokenRun`] (the texts end to end and where each ends): all but the
//! newest [`KEEP_PUBLISHED`] while the reply streams, all of them once another event (its
//! `turn_end`, as a rule) follows. A replay serialises those tokens again, to the same bytes
//! (`Published::with_envelope` is deterministic). What a client sees does not change; what a
//! session holds does: the profile of 1 000 live WebSocket streams put a third of coachd's heap
//! in logged events (BENCHMARKS.md).

use std::collections::VecDeque;
use std::sync::Arc;

use super::event::{EventBody, Published};

/// The newest tokens of a reply still streaming that stay as published: a client resuming
/// after a short drop, and the shared-log writer reading just behind the session, get the very
/// events; older ones are compacted in batches of as many.
const KEEP_PUBLISHED: usize = 8;

/// An event as published, or a run of tokens compacted (shared, so a replay takes it out of
/// the log's lock and serialises its tokens after, and with how many of its tokens are evicted).
#[derive(Debug)]
enum Entry {
    Event(Arc<Published>),
    Tokens(Arc<TokenRun>, usize),
}

/// Consecutive token events of one turn: seqs and indexes both one apart.
#[derive(Debug, Clone)]
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

/// A token event's turn, text and index; `None` for any other event.
fn token_of(event: &Published) -> Option<(u32, &str, u32)> {
    match &event.body {
        EventBody::Token {
            turn_number,
            text,
            index,
        } => Some((*turn_number, text, *index)),
        _ => None,
    }
}

impl TokenRun {
    /// Whether `event` is this run's next token: same turn, next seq, next index, and room
    /// left in the u32 offsets (a reply of 4 GiB is not a case, but it starts a run of its own).
    fn follows(&self, event: &Published) -> bool {
        let Some((turn_number, text, index)) = token_of(event) else {
            return false;
        };
        let n = self.ends.len() as u64;
        self.turn_number == turn_number
            && self.first_seq + n == event.seq
            && u64::from(self.first_index) + n == u64::from(index)
            && self.text.len() + text.len() <= u32::MAX as usize
    }

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
    /// Tokens pushed as published since the last compaction: when to compact next. Eviction
    /// may take some of them, so it can count high (compacting early), never low.
    tail_tokens: usize,
}

impl Ring {
    pub(super) fn new(capacity: usize) -> Self {
        Ring {
            entries: VecDeque::new(),
            held: 0,
            capacity: capacity.max(1),
            tail_tokens: 0,
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
    /// compacts every token just before it; a token compacts all but the newest
    /// [`KEEP_PUBLISHED`] once twice as many are waiting, so a long reply does not hold its
    /// tokens as published until it ends.
    pub(super) fn push(&mut self, event: Arc<Published>) {
        let token = token_of(&event).is_some();
        if !token {
            self.compact_tail(0);
        }
        self.entries.push_back(Entry::Event(event));
        self.held += 1;
        if token {
            self.tail_tokens += 1;
            if self.tail_tokens >= 2 * KEEP_PUBLISHED {
                self.compact_tail(KEEP_PUBLISHED);
            }
        }
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

    /// Turns the published tokens at the end of the ring, but for the newest `keep`, into runs
    /// (one per stretch of consecutive seqs and indexes of one turn), oldest first. The first
    /// goes on the run before it when it follows that run. With `keep` 0 the reply's tokens are
    /// all in and the last run is trimmed to size.
    fn compact_tail(&mut self, keep: usize) {
        let mut from = self.entries.len();
        while from > 0 && matches!(&self.entries[from - 1], Entry::Event(e) if token_of(e).is_some()) {
            from -= 1;
        }
        let to = self.entries.len() - keep.min(self.entries.len() - from);
        let kept = self.entries.split_off(to);
        let compacted: Vec<Entry> = self.entries.drain(from..).collect();
        self.tail_tokens = kept.len();
        // The run before the tail, reopened when the first token follows it.
        let mut run: Option<(TokenRun, usize)> = None;
        if let (Some(Entry::Event(first)), Some(Entry::Tokens(last, _))) =
            (compacted.first(), self.entries.back())
            && last.follows(first)
            && let Some(Entry::Tokens(last, skip)) = self.entries.pop_back()
        {
            run = Some((Arc::unwrap_or_clone(last), skip));
        }
        for entry in compacted {
            let Entry::Event(event) = entry else { continue };
            let Some((turn_number, text, index)) = token_of(&event) else {
                continue;
            };
            let (r, _) = match run.take() {
                Some(open) if open.0.follows(&event) => run.insert(open),
                done => {
                    if let Some((done, skip)) = done {
                        self.push_run(done, skip, true);
                    }
                    let fresh = TokenRun {
                        first_seq: event.seq,
                        turn_number,
                        first_index: index,
                        text: String::new(),
                        ends: Vec::new(),
                    };
                    run.insert((fresh, 0))
                }
            };
            r.text.push_str(text);
            r.ends.push(r.text.len() as u32);
        }
        match run {
            // A run that may grow on keeps its spare capacity, so appending stays amortised.
            Some((done, skip)) => self.push_run(done, skip, keep == 0),
            None if keep == 0 => {
                if let Some(Entry::Tokens(last, _)) = self.entries.back_mut()
                    && let Some(last) = Arc::get_mut(last)
                {
                    last.text.shrink_to_fit();
                    last.ends.shrink_to_fit();
                }
            }
            None => {}
        }
        self.entries.extend(kept);
    }

    fn push_run(&mut self, mut run: TokenRun, skip: usize, finished: bool) {
        if finished {
            run.text.shrink_to_fit();
            run.ends.shrink_to_fit();
        }
        self.entries.push_back(Entry::Tokens(Arc::new(run), skip));
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
    fn a_long_reply_still_streaming_holds_only_its_newest_tokens_as_published() {
        let mut ring = Ring::new(10_000);
        let mut all = Vec::new();
        for i in 0..100u32 {
            let event = token(u64::from(i) + 1, 1, i, &format!("w{i} "));
            all.push(event.clone());
            ring.push(event);
            let published = ring
                .entries
                .iter()
                .filter(|e| matches!(e, Entry::Event(_)))
                .count();
            assert!(
                published < 2 * KEEP_PUBLISHED,
                "{published} published after {} tokens",
                i + 1
            );
        }
        let runs = ring
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Tokens(..)))
            .count();
        assert_eq!(runs, 1, "each batch goes on the one run of the reply");
        for after in [0, 1, 50, 90, 95, 99, 100] {
            let expected: Vec<_> = all.iter().filter(|e| e.seq > after).cloned().collect();
            assert_eq!(
                bytes(&replay(&ring, after, usize::MAX)),
                bytes(&expected),
                "after {after}"
            );
        }
        let newest = replay(&ring, 99, 10);
        assert!(
            Arc::ptr_eq(&newest[0], &all[99]),
            "the newest token is the published one"
        );
        // The reply ends: all of it is one run, trimmed, and still replays exactly.
        ring.push(pong(101));
        all.push(pong(101));
        assert_eq!(ring.entries.len(), 2);
        assert_eq!(bytes(&replay(&ring, 0, usize::MAX)), bytes(&all));
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
