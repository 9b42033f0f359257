//! Port discovery: which interfaces are VM ports (members of a bridge, or named explicitly),
//! followed through rtnetlink link events rather than polling.

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::{Handle, constants::RTMGRP_LINK};

/// Where VM ports come from.
#[derive(Clone, Debug)]
pub enum PortSource {
    /// Every member of this bridge is a VM port.
    Bridge(String),
    /// Every member of any of these bridges (VMs may be restored onto another bridge).
    Bridges(Vec<String>),
    /// Exactly these interfaces.
    Named(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// The interface is (now) a VM port.
    Up { ifindex: u32, name: String },
    /// The interface is gone or no longer a VM port.
    Down { ifindex: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink request: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("no interface named {0:?}")]
    NoSuchInterface(String),
}

/// Follows the ports of a [`PortSource`]: the current ports, then changes as they happen.
pub struct PortWatcher {
    source: PortSource,
    bridges: Vec<u32>,
    handle: Handle,
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl PortWatcher {
    /// Subscribes to link events first, then lists, so no change between the two is missed.
    pub async fn new(source: PortSource) -> Result<Self, PortError> {
        let (mut conn, handle, messages) = rtnetlink::new_connection()?;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        tokio::spawn(conn);
        let names: &[String] = match &source {
            PortSource::Bridge(name) => std::slice::from_ref(name),
            PortSource::Bridges(names) => names,
            PortSource::Named(_) => &[],
        };
        let mut bridges = Vec::new();
        for name in names {
            bridges.push(link_index(&handle, name).await?);
        }
        Ok(Self {
            source,
            bridges,
            handle,
            messages,
        })
    }

    /// The ports there are now.
    pub async fn current(&self) -> Result<Vec<(u32, String)>, PortError> {
        let mut links = self.handle.link().get().execute();
        let mut ports = Vec::new();
        while let Some(link) = links.try_next().await? {
            if let Some((ifindex, name)) = self.port_of(&link) {
                ports.push((ifindex, name));
            }
        }
        if let PortSource::Named(names) = &self.source {
            for name in names {
                if !ports.iter().any(|(_, n)| n == name) {
                    return Err(PortError::NoSuchInterface(name.clone()));
                }
            }
        }
        Ok(ports)
    }

    /// The next change; `None` when the netlink socket closed.
    pub async fn next_event(&mut self) -> Option<PortEvent> {
        loop {
            let (msg, _) = self.messages.next().await?;
            let NetlinkPayload::InnerMessage(msg) = msg.payload else {
                continue;
            };
            match msg {
                RouteNetlinkMessage::NewLink(link) => {
                    let ifindex = link.header.index;
                    return Some(match self.port_of(&link) {
                        Some((ifindex, name)) => PortEvent::Up { ifindex, name },
                        // Left the bridge (or renamed away): the consumer ignores ports it
                        // does not have.
                        None => PortEvent::Down { ifindex },
                    });
                }
                RouteNetlinkMessage::DelLink(link) => {
                    return Some(PortEvent::Down {
                        ifindex: link.header.index,
                    });
                }
                _ => continue,
            }
        }
    }

    fn port_of(&self, link: &LinkMessage) -> Option<(u32, String)> {
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
        let is_port = match &self.source {
            PortSource::Bridge(_) | PortSource::Bridges(_) => link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(c) if self.bridges.contains(c))),
            PortSource::Named(names) => names.contains(&name),
        };
        is_port.then_some((link.header.index, name))
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, PortError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) | Err(_) => Err(PortError::NoSuchInterface(name.to_owned())),
    }
}
