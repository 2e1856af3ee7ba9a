//! Control protocol messages. One JSON object per line each way, so `socat - UNIX-CONNECT:..`
//! is a usable client:
//!
//! ```text
//! > {"cmd":"status"}
//! < {"ok":true,"name":"web","state":"running","pid":4242,"cpus":2,"memory_mib":1024,"uptime_secs":12}
//! > {"cmd":"pause"}
//! < {"ok":true}
//! > {"cmd":"bogus"}
//! < {"ok":false,"error":"Malformed request: unknown variant `bogus`, ..."}
//! > {"cmd":"console"}
//! < {"ok":true}
//!   ...from here on raw bytes: guest serial output ◀─▶ guest serial input
//! ```
//!
//! New commands are new [`Request`] variants; new reply payloads are new [`Response`] variants
//! placed before [`Response::Done`] (replies are matched in order).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vmm::machine::RunState;

/// Longest request line the server reads; anything longer is an error, not an allocation.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("Malformed request")]
    Request(#[source] serde_json::Error),
    #[error("Malformed reply")]
    Reply(#[source] serde_json::Error),
}

/// Most input events one `input` request may carry.
pub const MAX_INPUT_EVENTS: usize = 256;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Presses the ACPI power button.
    Shutdown,
    /// Pulls the plug.
    Poweroff,
    /// Turns the connection into a raw serial console after the reply.
    Console,
    /// Keyboard and pointer events for the guest, in order.
    Input {
        events: Vec<display::InputEvent>,
    },
    /// The window showing the guest changed size: ask the guest for this mode.
    DisplaySize {
        width: u32,
        height: u32,
    },
    /// Saves the running machine as a snapshot (named `name`, or by its time).
    SnapshotTake {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The VM's snapshot tree.
    SnapshotList,
    /// Replaces the running machine with the one a snapshot holds (by name or id); the VM
    /// process restarts itself into it (the control socket goes away for a moment).
    SnapshotRestore {
        snapshot: String,
    },
    /// Deletes a snapshot (by name or id), keeping every other snapshot's data.
    SnapshotDelete {
        snapshot: String,
    },
}

impl Request {
    pub fn parse(line: &str) -> Result<Request, ProtocolError> {
        serde_json::from_str(line).map_err(ProtocolError::Request)
    }

    pub fn to_line(&self) -> String {
        line_of(self)
    }
}

/// The payload of a successful `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub name: String,
    pub state: RunState,
    pub pid: u32,
    pub cpus: u32,
    pub memory_mib: u64,
    pub uptime_secs: u64,
    /// Unique per VM process start (a restore starts a new one, with the same pid).
    #[serde(default)]
    pub instance: u64,
    /// What the screen shows (`virtio-gpu 1280x800`); absent without a display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// The literal `true` or `false` in the `ok` field, so an untagged [`Response`] can tell
/// success from failure before looking at the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flag<const V: bool>;

impl<const V: bool> Serialize for Flag<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(V)
    }
}

impl<'de, const V: bool> Deserialize<'de> for Flag<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if bool::deserialize(d)? == V {
            Ok(Flag)
        } else {
            Err(serde::de::Error::custom(format_args!("expected ok = {V}")))
        }
    }
}

/// A server's reply: `{"ok":true, ...payload}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Error {
        ok: Flag<false>,
        error: String,
    },
    Status {
        ok: Flag<true>,
        #[serde(flatten)]
        status: StatusReply,
    },
    /// The snapshot just taken.
    Snapshot {
        ok: Flag<true>,
        snapshot: crate::snapshots::SnapshotInfo,
    },
    /// A VM's snapshots.
    Snapshots {
        ok: Flag<true>,
        #[serde(flatten)]
        list: crate::snapshots::SnapshotList,
    },
    /// Success with nothing to say; matches any `{"ok":true}` so it must stay last.
    Done {
        ok: Flag<true>,
    },
}

impl Response {
    pub fn done() -> Response {
        Response::Done { ok: Flag }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response::Error { ok: Flag, error: message.into() }
    }

    pub fn status(status: StatusReply) -> Response {
        Response::Status { ok: Flag, status }
    }

    pub fn parse(line: &str) -> Result<Response, ProtocolError> {
        serde_json::from_str(line).map_err(ProtocolError::Reply)
    }

    pub fn to_line(&self) -> String {
        line_of(self)
    }
}

fn line_of<T: Serialize>(value: &T) -> String {
    // These types hold only strings, numbers and enums: serializing cannot fail.
    let mut line = serde_json::to_string(value)
        .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"Internal: {e}\"}}"));
    line.push('\n');
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn every_request_parses_from_its_wire_form() {
        let cases = [
            (r#"{"cmd":"status"}"#, Request::Status),
            (r#"{"cmd":"pause"}"#, Request::Pause),
            (r#"{"cmd":"resume"}"#, Request::Resume),
            (r#"{"cmd":"shutdown"}"#, Request::Shutdown),
            (r#"{"cmd":"poweroff"}"#, Request::Poweroff),
            (r#" {"cmd": "console"} "#, Request::Console),
            (
                r#"{"cmd":"input","events":[{"type":"key","code":30,"down":true}]}"#,
                Request::Input { events: vec![display::InputEvent::Key { code: 30, down: true }] },
            ),
            (
                r#"{"cmd":"display_size","width":1280,"height":800}"#,
                Request::DisplaySize { width: 1280, height: 800 },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(Request::parse(line).unwrap(), want, "{line}");
            assert_eq!(Request::parse(want.to_line().trim_end()).unwrap(), want.clone());
        }
    }

    #[test]
    fn garbage_requests_are_errors() {
        for line in [
            "",
            "status",
            "{",
            "null",
            "[]",
            r#"{"cmd":"bogus"}"#,
            r#"{"cmd":5}"#,
            r#"{"command":"status"}"#,
            "\u{0}\u{1}",
        ] {
            assert!(Request::parse(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn unknown_command_error_names_it() {
        let err = vmm::error_chain(&Request::parse(r#"{"cmd":"bogus"}"#).unwrap_err());
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn replies_have_the_documented_wire_form() {
        assert_eq!(Response::done().to_line(), "{\"ok\":true}\n");
        assert_eq!(Response::error("No").to_line(), "{\"ok\":false,\"error\":\"No\"}\n");
        let status = StatusReply {
            name: "web".into(),
            state: RunState::Running,
            pid: 7,
            cpus: 2,
            memory_mib: 512,
            uptime_secs: 3,
            instance: 5,
            display: None,
        };
        let line = Response::status(status.clone()).to_line();
        assert_eq!(
            line,
            "{\"ok\":true,\"name\":\"web\",\"state\":\"running\",\"pid\":7,\"cpus\":2,\
             \"memory_mib\":512,\"uptime_secs\":3,\"instance\":5}\n"
        );
        assert_eq!(Response::parse(&line).unwrap(), Response::status(status));
    }

    #[test]
    fn replies_round_trip_and_ok_decides_the_variant() {
        for r in [Response::done(), Response::error("boom")] {
            assert_eq!(Response::parse(&r.to_line()).unwrap(), r);
        }
        assert!(Response::parse(r#"{"ok":false}"#).is_err());
        assert!(Response::parse(r#"{"error":"x"}"#).is_err());
        assert!(Response::parse("garbage").is_err());
    }
}
