//! Control protocol messages. One JSON object per line each way, so `socat - UNIX-CONNECT:..`
//! is a usable client. Every connection opens with a hello naming the protocol version:
//!
//! ```text
//! > {"cmd":"hello","version":2}
//! < {"ok":true,"reply":"hello","version":2}
//! > {"cmd":"status"}
//! < {"ok":true,"reply":"status","name":"web","state":"running","pid":4242,"cpus":2,...}
//! > {"cmd":"pause"}
//! < {"ok":true,"reply":"done"}
//! > {"cmd":"bogus"}
//! < {"ok":false,"reply":"error","error":"Malformed request: unknown variant `bogus`, ..."}
//! > {"cmd":"console"}
//! < {"ok":true,"reply":"done"}
//!   ...from here on raw bytes: guest serial output ◀─▶ guest serial input
//! ```
//!
//! Every reply says `ok` and its kind in `reply` (`hello`, `done`, `status`, `snapshot`,
//! `snapshots`, `error`). A first line that is not a hello (what a version-1 client sends), or
//! a hello with another version, is answered with an error naming both versions, and the
//! server hangs up.
//!
//! The requests are declared once, in [`for_each_request`]: that list makes the [`Request`]
//! enum, the [`ControlTarget`] trait the VM process implements (one method per request),
//! [`apply`] (a request → the target's method → its [`Response`]) and the client's typed
//! helpers (`client.rs`). A new command is one new line there.

use serde::{Deserialize, Serialize};
/// A VM's coarse state, as `status` reports it (the machine's own type).
pub use vmm::machine::RunState;

use crate::snapshots::{SnapshotInfo, SnapshotList};

/// The protocol version this build speaks; the hello carries it. Version 1 had no hello and
/// untagged replies.
pub const VERSION: u32 = 2;

/// Longest request line the server reads; anything longer is an error, not an allocation.
pub const MAX_LINE: usize = 64 * 1024;

/// Most input events one `input` request may carry.
pub const MAX_INPUT_EVENTS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("Malformed request")]
    Request(#[source] serde_json::Error),
    #[error("Malformed reply")]
    Reply(#[source] serde_json::Error),
    #[error("Malformed reply: \"ok\" is {ok} in a '{kind}' reply")]
    ReplyOk { ok: bool, kind: &'static str },
}

/// The requests a [`ControlTarget`] answers, declared once. Each entry: the variant (its wire
/// name is the variant in snake_case under `cmd`), its fields, the target's method and what
/// it returns (a [`Reply`] type), and optionally `else "message"`: the error a target that
/// does not implement the method answers. `$then!` is invoked with the whole list.
macro_rules! for_each_request {
    ($then:ident) => {
        $then! {
            /// The VM's state, CPUs, memory, uptime.
            Status {} => status -> crate::control::protocol::StatusReply;
            Pause {} => pause -> ();
            Resume {} => resume -> ();
            /// Presses the ACPI power button.
            Shutdown {} => shutdown -> ();
            /// Pulls the plug.
            Poweroff {} => poweroff -> ();
            /// Keyboard and pointer events for the guest, in order.
            Input { events: Vec<display::InputEvent> } => input -> ();
            /// The window showing the guest changed size: ask the guest for this mode.
            DisplaySize { width: u32, height: u32 } => display_size -> ();
            /// Saves the running machine as a snapshot (named `name`, or by its time).
            SnapshotTake {
                #[serde(default, skip_serializing_if = "Option::is_none")]
                name: Option<String>,
            } => snapshot_take -> crate::snapshots::SnapshotInfo,
                else "This VM cannot take snapshots";
            /// The VM's snapshot tree.
            SnapshotList {} => snapshot_list -> crate::snapshots::SnapshotList,
                else "This VM has no snapshots";
            /// Replaces the running machine with the one a snapshot holds (by name or id); the
            /// VM process restarts itself into it (the control socket goes away for a moment).
            SnapshotRestore { snapshot: String } => snapshot_restore -> (),
                else "This VM cannot restore snapshots";
            /// Deletes a snapshot (by name or id), keeping every other snapshot's data.
            SnapshotDelete { snapshot: String } => snapshot_delete -> (),
                else "This VM cannot delete snapshots";
            /// Forwards a host port to the guest now (`tcp:127.0.0.1:2222-:22`); a busy host
            /// port is an error naming it.
            ForwardAdd { spec: String } => forward_add -> (),
                else "This VM has no user-mode network";
            /// Stops forwarding a host port (the spec as added).
            ForwardRemove { spec: String } => forward_remove -> (),
                else "This VM has no user-mode network";
            /// Puts the ISO at `iso` (an absolute path) in the CD drive, or without one
            /// ejects it; the guest sees the drive's new size.
            Media {
                #[serde(default, skip_serializing_if = "Option::is_none")]
                iso: Option<std::path::PathBuf>,
            } => media -> (),
                else "This VM has no CD drive";
        }
    };
}
pub(crate) use for_each_request;

/// Expands [`for_each_request`] into [`Request`], [`ControlTarget`] and [`apply`].
macro_rules! declare_protocol {
    (@method $(#[$doc:meta])* $method:ident ($($field:ident: $fty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        fn $method(&self $(, $field: $fty)*) -> anyhow::Result<$ret>;
    };
    (@method $(#[$doc:meta])* $method:ident ($($field:ident: $fty:ty),*) -> $ret:ty,
     $unsupported:literal) => {
        $(#[$doc])*
        fn $method(&self $(, $field: $fty)*) -> anyhow::Result<$ret> {
            let _ = ($($field,)*);
            Err(anyhow::anyhow!($unsupported))
        }
    };
    ($(
        $(#[$doc:meta])*
        $variant:ident { $($(#[$fattr:meta])* $field:ident: $fty:ty),* $(,)? }
            => $method:ident -> $ret:ty $(, else $unsupported:literal)?;
    )*) => {
        /// A client's request.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "cmd", rename_all = "snake_case")]
        pub enum Request {
            /// The first line of every connection: the client's protocol version.
            Hello { version: u32 },
            /// Turns the connection into a raw serial console after the reply (served by the
            /// control server itself, not by [`apply`]).
            Console,
            $($(#[$doc])* $variant { $($(#[$fattr])* $field: $fty),* },)*
        }

        /// What a VM process controls: one method per [`Request`] (but `hello` and `console`,
        /// which the server handles). The VM process implements it for its machine.
        pub trait ControlTarget {
            $(declare_protocol!(@method $(#[$doc])* $method ($($field: $fty),*) -> $ret
                $(, $unsupported)?);)*
        }

        /// Answers `request` with `target`: the method's value as its reply, its error (the
        /// whole chain) as an error reply.
        pub fn apply(request: Request, target: &dyn ControlTarget) -> Response {
            match request {
                Request::Hello { .. } => Response::error("This connection already said hello"),
                Request::Console => Response::error("The console is not available here"),
                Request::Input { events } if events.len() > MAX_INPUT_EVENTS => {
                    Response::error(format!(
                        "Too many input events ({}; at most {MAX_INPUT_EVENTS})",
                        events.len()
                    ))
                }
                $(Request::$variant { $($field),* } => match target.$method($($field),*) {
                    Ok(value) => Reply::into_response(value),
                    Err(e) => Response::error(format!("{e:#}")),
                },)*
            }
        }
    };
}

for_each_request!(declare_protocol);

impl Request {
    pub fn parse(line: &str) -> Result<Request, ProtocolError> {
        serde_json::from_str(line).map_err(ProtocolError::Request)
    }

    pub fn to_line(&self) -> String {
        line_of(self)
    }

    /// This build's hello.
    pub fn hello() -> Request {
        Request::Hello { version: VERSION }
    }
}

/// What the server answers to the first line of a connection: `Ok` (the hello reply) lets
/// the connection go on; `Err` is the error to send before hanging up.
pub fn greet(first_line: &str) -> Result<Response, Response> {
    match Request::parse(first_line) {
        Ok(Request::Hello { version: VERSION }) => Ok(Response::Hello { version: VERSION }),
        Ok(Request::Hello { version }) => Err(Response::error(format!(
            "Control protocol version mismatch: this VM process speaks version {VERSION}, the \
             client version {version}; use the hutch that started the VM, or restart the VM"
        ))),
        _ => Err(Response::error(format!(
            "This VM process speaks control protocol version {VERSION}: the first line must be \
             {{\"cmd\":\"hello\",\"version\":{VERSION}}} (a client without a hello speaks \
             version 1; use the hutch that started the VM, or restart the VM)"
        ))),
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
    /// The network card, absent without one (boxed: most replies are small).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Box<NetStatus>>,
    /// The CD drive, absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cd: Option<CdStatus>,
}

/// A running VM's CD drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdStatus {
    /// The ISO in it; absent when it is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso: Option<std::path::PathBuf>,
}

/// A running VM's network card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    /// `user`.
    pub mode: String,
    /// The address the guest leased from the NAT's DHCP, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// The port forwards active now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<String>,
}

/// A server's reply. On the wire: `{"ok":BOOL,"reply":KIND,...payload}`, `ok` false only for
/// [`Response::Error`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// The server's version, answering the client's hello.
    Hello {
        version: u32,
    },
    /// Success with nothing to say.
    Done,
    Status(StatusReply),
    /// The snapshot just taken (boxed: it is much larger than the other replies).
    Snapshot {
        snapshot: Box<SnapshotInfo>,
    },
    /// A VM's snapshots.
    Snapshots(SnapshotList),
    Error {
        error: String,
    },
}

#[derive(Serialize)]
struct WireOut<'a> {
    ok: bool,
    #[serde(flatten)]
    response: &'a Response,
}

#[derive(Deserialize)]
struct WireIn {
    ok: bool,
    #[serde(flatten)]
    response: Response,
}

impl Response {
    pub fn done() -> Response {
        Response::Done
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response::Error { error: message.into() }
    }

    pub fn status(status: StatusReply) -> Response {
        Response::Status(status)
    }

    pub fn is_ok(&self) -> bool {
        !matches!(self, Response::Error { .. })
    }

    /// The `reply` tag.
    fn kind(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "hello",
            Response::Done => "done",
            Response::Status(_) => "status",
            Response::Snapshot { .. } => "snapshot",
            Response::Snapshots(_) => "snapshots",
            Response::Error { .. } => "error",
        }
    }

    pub fn parse(line: &str) -> Result<Response, ProtocolError> {
        let wire: WireIn = serde_json::from_str(line).map_err(ProtocolError::Reply)?;
        if wire.ok != wire.response.is_ok() {
            return Err(ProtocolError::ReplyOk { ok: wire.ok, kind: wire.response.kind() });
        }
        Ok(wire.response)
    }

    pub fn to_line(&self) -> String {
        line_of(&WireOut { ok: self.is_ok(), response: self })
    }
}

/// What a [`ControlTarget`] method returns, and the [`Response`] that carries it.
pub trait Reply: Sized {
    fn into_response(self) -> Response;
    /// The value a reply carries; any other reply is given back.
    fn from_response(response: Response) -> Result<Self, Response>;
}

impl Reply for () {
    fn into_response(self) -> Response {
        Response::Done
    }
    fn from_response(response: Response) -> Result<(), Response> {
        match response {
            Response::Done => Ok(()),
            other => Err(other),
        }
    }
}

impl Reply for SnapshotInfo {
    fn into_response(self) -> Response {
        Response::Snapshot { snapshot: Box::new(self) }
    }
    fn from_response(response: Response) -> Result<SnapshotInfo, Response> {
        match response {
            Response::Snapshot { snapshot } => Ok(*snapshot),
            other => Err(other),
        }
    }
}

/// A [`Reply`] that is the payload of one newtype [`Response`] variant.
macro_rules! newtype_reply {
    ($($ty:ty => $variant:ident),*) => {$(
        impl Reply for $ty {
            fn into_response(self) -> Response {
                Response::$variant(self)
            }
            fn from_response(response: Response) -> Result<$ty, Response> {
                match response {
                    Response::$variant(value) => Ok(value),
                    other => Err(other),
                }
            }
        }
    )*};
}

newtype_reply!(StatusReply => Status, SnapshotList => Snapshots);

fn line_of<T: Serialize>(value: &T) -> String {
    // These types hold only strings, numbers and enums: serializing cannot fail.
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"reply\":\"error\",\"error\":\"Internal: {e}\"}}")
    });
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
            (r#"{"cmd":"hello","version":2}"#, Request::Hello { version: 2 }),
            (r#"{"cmd":"status"}"#, Request::Status {}),
            (r#"{"cmd":"pause"}"#, Request::Pause {}),
            (r#"{"cmd":"resume"}"#, Request::Resume {}),
            (r#"{"cmd":"shutdown"}"#, Request::Shutdown {}),
            (r#"{"cmd":"poweroff"}"#, Request::Poweroff {}),
            (r#" {"cmd": "console"} "#, Request::Console),
            (
                r#"{"cmd":"input","events":[{"type":"key","code":30,"down":true}]}"#,
                Request::Input { events: vec![display::InputEvent::Key { code: 30, down: true }] },
            ),
            (
                r#"{"cmd":"display_size","width":1280,"height":800}"#,
                Request::DisplaySize { width: 1280, height: 800 },
            ),
            (r#"{"cmd":"snapshot_take"}"#, Request::SnapshotTake { name: None }),
            (
                r#"{"cmd":"snapshot_take","name":"a"}"#,
                Request::SnapshotTake { name: Some("a".into()) },
            ),
            (r#"{"cmd":"snapshot_list"}"#, Request::SnapshotList {}),
            (
                r#"{"cmd":"snapshot_restore","snapshot":"s1"}"#,
                Request::SnapshotRestore { snapshot: "s1".into() },
            ),
            (
                r#"{"cmd":"snapshot_delete","snapshot":"s1"}"#,
                Request::SnapshotDelete { snapshot: "s1".into() },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(Request::parse(line).unwrap(), want, "{line}");
            assert_eq!(Request::parse(want.to_line().trim_end()).unwrap(), want.clone());
        }
        assert_eq!(Request::Status {}.to_line(), "{\"cmd\":\"status\"}\n");
        assert_eq!(Request::hello().to_line(), "{\"cmd\":\"hello\",\"version\":2}\n");
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
            r#"{"cmd":"hello"}"#,
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
        assert_eq!(Response::done().to_line(), "{\"ok\":true,\"reply\":\"done\"}\n");
        assert_eq!(
            Response::error("No").to_line(),
            "{\"ok\":false,\"reply\":\"error\",\"error\":\"No\"}\n"
        );
        assert_eq!(
            Response::Hello { version: 2 }.to_line(),
            "{\"ok\":true,\"reply\":\"hello\",\"version\":2}\n"
        );
        let status = StatusReply {
            name: "web".into(),
            state: RunState::Running,
            pid: 7,
            cpus: 2,
            memory_mib: 512,
            uptime_secs: 3,
            instance: 5,
            display: None,
            net: None,
            cd: Some(CdStatus { iso: Some("/isos/debian.iso".into()) }),
        };
        let line = Response::status(status.clone()).to_line();
        assert_eq!(
            line,
            "{\"ok\":true,\"reply\":\"status\",\"name\":\"web\",\"state\":\"running\",\"pid\":7,\
             \"cpus\":2,\"memory_mib\":512,\"uptime_secs\":3,\"instance\":5,\
             \"cd\":{\"iso\":\"/isos/debian.iso\"}}\n"
        );
        assert_eq!(Response::parse(&line).unwrap(), Response::status(status));
        let list = SnapshotList { snapshots: Vec::new(), current: Some("s1".into()) };
        let line = Response::Snapshots(list.clone()).to_line();
        assert_eq!(
            line,
            "{\"ok\":true,\"reply\":\"snapshots\",\"snapshots\":[],\"current\":\"s1\"}\n"
        );
        assert_eq!(Response::parse(&line).unwrap(), Response::Snapshots(list));
    }

    #[test]
    fn replies_round_trip_and_ok_must_match_the_kind() {
        for r in [Response::done(), Response::error("boom"), Response::Hello { version: 9 }] {
            assert_eq!(Response::parse(&r.to_line()).unwrap(), r);
        }
        for bad in [
            r#"{"ok":false,"reply":"done"}"#,
            r#"{"ok":true,"reply":"error","error":"x"}"#,
            r#"{"ok":true}"#,
            r#"{"ok":false,"error":"x"}"#,
            r#"{"reply":"done"}"#,
            "garbage",
        ] {
            assert!(Response::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_hello_of_this_version_opens_a_connection() {
        assert_eq!(greet(r#"{"cmd":"hello","version":2}"#), Ok(Response::Hello { version: 2 }));
        let Err(Response::Error { error }) = greet(r#"{"cmd":"hello","version":3}"#) else {
            panic!("accepted")
        };
        assert!(error.contains("version 2") && error.contains("version 3"), "{error}");
        for first in [r#"{"cmd":"status"}"#, "garbage"] {
            let Err(Response::Error { error }) = greet(first) else { panic!("accepted") };
            assert!(error.contains("version 2") && error.contains("version 1"), "{error}");
        }
    }

    struct Unsupported;

    impl ControlTarget for Unsupported {
        fn status(&self) -> anyhow::Result<StatusReply> {
            Err(anyhow::anyhow!("inner").context("Status failed"))
        }
        fn pause(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn resume(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn shutdown(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn poweroff(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn input(&self, _events: Vec<display::InputEvent>) -> anyhow::Result<()> {
            Ok(())
        }
        fn display_size(&self, _width: u32, _height: u32) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn apply_maps_values_errors_and_unimplemented_methods_to_replies() {
        assert_eq!(apply(Request::Pause {}, &Unsupported), Response::Done);
        assert_eq!(
            apply(Request::Status {}, &Unsupported),
            Response::error("Status failed: inner")
        );
        assert_eq!(
            apply(Request::SnapshotList {}, &Unsupported),
            Response::error("This VM has no snapshots")
        );
        let flood = vec![display::InputEvent::PointerRel { dx: 1, dy: 1 }; MAX_INPUT_EVENTS + 1];
        let Response::Error { error } = apply(Request::Input { events: flood }, &Unsupported)
        else {
            panic!("accepted")
        };
        assert!(error.contains("Too many"), "{error}");
    }
}
