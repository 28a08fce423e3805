//! The WebSocket client-frame parser, through `WsTransport::recv` as the drive loop calls it.
//! Checks: it never panics; a text frame is a `Frame` exactly when it parses as a `ClientFrame`,
//! and that frame serialises and parses back to itself; anything else is `Invalid` (text) or a
//! 1003 close (binary).
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::ws::Message;
use coachd::session::ClientFrame;
use coachd::transport::ws::{WsTransport, close};
use coachd::transport::{Detach, Inbound, Transport};
use futures::{Sink, Stream};
use libfuzzer_sys::fuzz_target;

/// A socket whose client sent one frame; what the server sends is dropped.
struct OneFrame(Option<Message>);

impl Sink<Message> for OneFrame {
    type Error = std::io::Error;
    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(self: Pin<&mut Self>, _: Message) -> Result<(), Self::Error> {
        Ok(())
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

impl Stream for OneFrame {
    type Item = Result<Message, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.take().map(Ok))
    }
}

fn recv(message: Message) -> Inbound {
    let mut transport = WsTransport::new(
        OneFrame(Some(message)),
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(5),
    );
    let mut fut = std::pin::pin!(transport.recv());
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(inbound) => inbound,
        Poll::Pending => panic!("recv is pending with a frame available"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    if kind % 4 == 0 {
        // Binary frames are refused whatever they hold.
        let got = recv(Message::Binary(bytes::Bytes::copy_from_slice(payload)));
        assert!(
            matches!(got, Inbound::Fatal(Detach::Protocol { code, .. }) if code == close::UNSUPPORTED),
            "{got:?}"
        );
        return;
    }
    // axum hands over only text frames that are valid UTF-8.
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let direct = serde_json::from_str::<ClientFrame>(text);
    match recv(Message::Text(text.into())) {
        Inbound::Frame(frame) => {
            assert_eq!(direct.as_ref().ok(), Some(&frame));
            let json = serde_json::to_string(&frame).expect("a frame serialises");
            let again: ClientFrame = serde_json::from_str(&json).expect("its own JSON parses");
            assert_eq!(again, frame, "{json}");
        }
        Inbound::Invalid(message) => {
            assert!(direct.is_err(), "refused a frame that parses: {text:?}");
            assert!(message.starts_with("malformed frame"), "{message}");
        }
        other => panic!("a text frame gave {other:?}"),
    }
});
