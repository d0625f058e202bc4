//! Hubble's gRPC API served by the agent, so that Hubble's own tools work against a plain
//! Docker host: the `hubble` CLI (`observe`, `status`, `list nodes`), Hubble Relay (which
//! finds the node through peer.Peer and reads observer.Observer), and Hubble UI through Relay.
//!
//! - [`api`]: the code generated from dataplane/proto (our text of Hubble's wire contract);
//! - [`filter`]: Hubble's flow filters on our flows;
//! - [`server`]: observer.Observer (GetFlows: history, follow, filters; ServerStatus;
//!   GetNodes), peer.Peer (Notify) and grpc.health.v1 (which `hubble status` asks first).
//!
//! Flows come from the flow pipeline's [`crate::flows::hub::Hub`]: the history of recent
//! records and a broadcast of new ones; each record's Hubble JSON line is decoded into the
//! generated types by pbjson (strict), once per record, when a client first needs it.

pub mod api;
pub mod filter;
pub mod server;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::flows::hub::Hub;

/// Where the API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Off,
}

pub const DEFAULT_LISTEN: &str = "unix:///run/dataplane/hubble.sock";

pub fn parse_listen(text: &str) -> Result<Listen, String> {
    if text == "none" {
        return Ok(Listen::Off);
    }
    if let Some(path) = text.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(format!("{text:?}: expected unix:///absolute/path"));
        }
        return Ok(Listen::Unix(path.into()));
    }
    text.parse::<SocketAddr>()
        .map(Listen::Tcp)
        .map_err(|_| format!("{text:?}: expected unix:///PATH, ADDRESS:PORT or none"))
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix://{}", path.display()),
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Off => write!(f, "none"),
        }
    }
}

/// The agent's options for the API.
#[derive(clap::Args, Debug, Clone)]
pub struct HubbleArgs {
    /// Where Hubble's gRPC API (observer.Observer, peer.Peer) is served: unix:///PATH, a TCP
    /// address such as 0.0.0.0:4244, or `none` [default: unix:///run/dataplane/hubble.sock,
    /// or NAME.hubble.sock beside a --socket NAME.sock given, so that agents side by side
    /// each have their own].
    #[arg(long, value_parser = parse_listen, value_name = "ADDR")]
    pub hubble_listen: Option<Listen>,
    /// The address this node announces to Hubble Relay through peer.Peer (default: the
    /// --hubble-listen address).
    #[arg(long, value_name = "ADDR")]
    pub hubble_advertise: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubbleError {
    #[error(
        "cannot listen for Hubble's API on {listen}: {source} (another agent? give \
         --hubble-listen another address, or `--hubble-listen none`)"
    )]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
}

impl HubbleArgs {
    /// The address to listen on, given the agent's control socket.
    pub fn listen(&self, control_socket: &Path) -> Listen {
        if let Some(listen) = &self.hubble_listen {
            return listen.clone();
        }
        if control_socket == Path::new(crate::control::DEFAULT_SOCKET) {
            return Listen::Unix(DEFAULT_LISTEN.trim_start_matches("unix://").into());
        }
        let stem = control_socket
            .file_stem()
            .map_or("dataplane".into(), |s| s.to_string_lossy());
        Listen::Unix(control_socket.with_file_name(format!("{stem}.hubble.sock")))
    }
}

/// Binds the API's socket and serves it from its own task (nothing when `none`).
pub async fn spawn(
    args: &HubbleArgs,
    control_socket: &Path,
    hub: Arc<Hub>,
) -> Result<(), HubbleError> {
    let listen = args.listen(control_socket);
    let advertise = args
        .hubble_advertise
        .clone()
        .unwrap_or_else(|| listen.to_string());
    let incoming = match server::bind(&listen).await {
        Ok(Some(incoming)) => incoming,
        Ok(None) => return Ok(()),
        Err(source) => {
            return Err(HubbleError::Bind {
                listen: listen.to_string(),
                source,
            });
        }
    };
    log::info!("Hubble API on {listen}");
    tokio::spawn(server::serve(incoming, hub, advertise));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            parse_listen(DEFAULT_LISTEN),
            Ok(Listen::Unix("/run/dataplane/hubble.sock".into()))
        );
        assert_eq!(
            parse_listen("0.0.0.0:4244"),
            Ok(Listen::Tcp("0.0.0.0:4244".parse().unwrap()))
        );
        assert_eq!(parse_listen("none"), Ok(Listen::Off));
        assert!(parse_listen("unix://relative").is_err());
        assert!(parse_listen("4244").is_err());
        assert_eq!(
            Listen::Unix("/x/h.sock".into()).to_string(),
            "unix:///x/h.sock"
        );
        let args = HubbleArgs {
            hubble_listen: None,
            hubble_advertise: None,
        };
        assert_eq!(
            args.listen(Path::new(crate::control::DEFAULT_SOCKET)),
            Listen::Unix("/run/dataplane/hubble.sock".into())
        );
        assert_eq!(
            args.listen(Path::new("/run/dataplane/t1.sock")),
            Listen::Unix("/run/dataplane/t1.hubble.sock".into())
        );
    }
}
