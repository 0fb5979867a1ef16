//! A WebSocket client for tests of the demo app's `GET /ws` echo (directly or through a switch):
//! one echo at a time, or a client that keeps sending until the server closes the connection.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on waiting for one echo.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// An open WebSocket client connection.
pub type WebSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `url` (`ws://host:port/ws`).
///
/// # Errors
/// The connection or the upgrade failed.
pub async fn connect(url: &str) -> Result<WebSocket, Error> {
    Ok(tokio_tungstenite::connect_async(url).await?.0)
}

/// Sends `text` and returns the echo (`<slot> <text>` from the demo app).
///
/// # Errors
/// Sending failed, or no text answer came within [`ECHO_TIMEOUT`] (what came instead).
pub async fn echo(ws: &mut WebSocket, text: &str) -> Result<String, String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("sending {text:?}: {e}"))?;
    match tokio::time::timeout(ECHO_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => Ok(t.as_str().to_string()),
        other => Err(format!("no echo for {text:?}: {other:?}")),
    }
}

/// How a client that kept sending ended: the echoes it got, in order, then the server's close.
#[derive(Debug)]
pub struct ClosedWhileSending {
    /// The text answers, in order.
    pub echoes: Vec<String>,
    /// The close frame the server sent (`None` for a close frame without a code).
    pub close: Option<CloseFrame>,
}

/// Sends `m0`, `m1`, … (numbered by the echoes received so far) every `every` and reads the
/// answers until the server sends a close frame. Sending may fail once the close has arrived
/// and been answered; that is not an error.
///
/// # Errors
/// The connection ended without a close frame (reset, or a read error).
pub async fn send_until_closed(
    mut ws: WebSocket,
    every: Duration,
) -> Result<ClosedWhileSending, String> {
    let mut echoes = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = ws.send(Message::text(format!("m{}", echoes.len()))).await;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => echoes.push(t.as_str().to_string()),
                Some(Ok(Message::Close(close))) => return Ok(ClosedWhileSending { echoes, close }),
                Some(Ok(_)) => {}
                other => {
                    return Err(format!(
                        "the connection ended without a close frame after {} echoes: {other:?}",
                        echoes.len()
                    ))
                }
            }
        }
    }
}
