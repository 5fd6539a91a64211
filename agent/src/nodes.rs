//! Which node each backend is on. Backends name their node by a small id
//! (`Backend::node`), and `svl_nodes_v1` holds each id's address, so a
//! node's address is stored once, not once per pod. Id `NODE_LOCAL` is this
//! node (and pods whose node is not known, reached by routing as before).
//! Ids are this agent's own numbering: nothing outside this node sees them.
//! An id lives while some programmed backend slot refers to it.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use serviceless_common::{NODE_F_PRESENT, NODE_LOCAL, NodeValue};

use crate::{
    maps::{DataplaneMaps, MapWriteError},
    model::{from_addr, to_addr},
};

#[derive(Debug, Default)]
pub struct Nodes {
    /// This node's addresses: pods there are local.
    own: HashSet<IpAddr>,
    by_addr: HashMap<IpAddr, u16>,
    addr_of: HashMap<u16, IpAddr>,
    /// Programmed backend slots naming each id.
    refs: HashMap<u16, usize>,
    free: BTreeSet<u16>,
    next: u16,
}

impl Nodes {
    /// Takes over the ids already in `svl_nodes_v1`; `slots` are the node
    /// ids of every programmed backend slot.
    pub fn adopt(maps: &DataplaneMaps, own: HashSet<IpAddr>, slots: impl Iterator<Item = u16>) -> Self {
        let mut nodes = Nodes { own, next: NODE_LOCAL + 1, ..Default::default() };
        for (id, value) in maps.nodes() {
            if id == NODE_LOCAL {
                continue;
            }
            let addr = from_addr(&value.addr);
            nodes.by_addr.insert(addr, id);
            nodes.addr_of.insert(id, addr);
            nodes.next = nodes.next.max(id + 1);
        }
        for id in slots.filter(|id| *id != NODE_LOCAL) {
            *nodes.refs.entry(id).or_default() += 1;
        }
        nodes.free = (NODE_LOCAL + 1..nodes.next).filter(|id| !nodes.addr_of.contains_key(id)).collect();
        nodes
    }

    /// The id for a pod on `node`, creating its entry if it is new. Does
    /// not count a reference: `referenced` does, once the slot is written.
    pub fn id(&mut self, maps: &mut DataplaneMaps, node: Option<IpAddr>) -> Result<u16, MapWriteError> {
        let Some(addr) = node.filter(|a| !self.own.contains(a) && !a.is_unspecified()) else {
            return Ok(NODE_LOCAL);
        };
        if let Some(&id) = self.by_addr.get(&addr) {
            return Ok(id);
        }
        let id = match self.free.pop_first() {
            Some(id) => id,
            None if self.next < u16::MAX => {
                self.next += 1;
                self.next - 1
            }
            None => {
                return Err(MapWriteError::Full {
                    map: serviceless_common::map_names::NODES,
                    capacity: u16::MAX as u32,
                    flag: "--max-nodes",
                });
            }
        };
        if let Err(e) = maps.put_node(id, &NodeValue { addr: to_addr(addr), flags: NODE_F_PRESENT, pad: 0 }) {
            self.free.insert(id);
            return Err(e);
        }
        self.by_addr.insert(addr, id);
        self.addr_of.insert(id, addr);
        Ok(id)
    }

    /// A slot naming `id` was written.
    pub fn referenced(&mut self, id: u16) {
        if id != NODE_LOCAL {
            *self.refs.entry(id).or_default() += 1;
        }
    }

    /// A slot naming `id` was overwritten or deleted.
    pub fn released(&mut self, id: u16) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
    }

    /// Frees ids no slot names any more (their entries are cleared: no
    /// backend points at them, so no packet reads them).
    pub fn sweep(&mut self, maps: &mut DataplaneMaps) {
        let unused: Vec<u16> =
            self.addr_of.keys().copied().filter(|id| self.refs.get(id).copied().unwrap_or(0) == 0).collect();
        for id in unused {
            if maps.put_node(id, &NodeValue::default()).is_err() {
                continue;
            }
            if let Some(addr) = self.addr_of.remove(&id) {
                self.by_addr.remove(&addr);
            }
            self.refs.remove(&id);
            self.free.insert(id);
        }
    }

    /// Addresses of the other nodes pods are on.
    pub fn remote(&self) -> Vec<IpAddr> {
        self.addr_of.values().copied().collect()
    }

    pub fn addr(&self, id: u16) -> Option<IpAddr> {
        self.addr_of.get(&id).copied()
    }
}
