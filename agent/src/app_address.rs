//! `AppAddress`: the record that an app (a hostname, owned by one
//! namespace) holds a VIP, as an IPAddress object records a Service's
//! ClusterIP.
//!
//! Cluster-scoped and named after the VIP, so the API server itself makes
//! two apps holding one VIP impossible: a second create of the same name
//! fails. Only the elected allocator (`serviceless allocate`) writes them,
//! one create per new app; agents only read them. A hostname's owner is the
//! namespace of its oldest record, so ownership outlives pod churn, scale
//! to zero and agent restarts. A record never changes (nobody may update
//! one: the allocator's role has no `update`); an app that moves to another
//! VIP gets a new record and the old one is deleted.

use std::net::IpAddr;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The record's spec: which app holds the VIP the object is named after.
#[derive(CustomResource, JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "serviceless.io",
    version = "v1alpha1",
    kind = "AppAddress",
    plural = "appaddresses",
    shortname = "appaddr",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Hostname","type":"string","jsonPath":".spec.hostname"}"#,
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.namespace"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AppAddressSpec {
    /// The VIP (the object's name is this address, encoded).
    pub address: String,
    /// The app's hostname.
    #[schemars(length(min = 1, max = 253))]
    pub hostname: String,
    /// The namespace that owns the hostname.
    pub namespace: String,
}

/// The object name for a VIP: the address itself for IPv4; for IPv6 its
/// eight groups, zero-padded, joined by '-' (names may not hold ':').
pub fn object_name(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.segments().iter().map(|s| format!("{s:04x}")).collect::<Vec<_>>().join("-"),
    }
}

/// One record, as the index keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub name: String,
    pub vip: IpAddr,
    pub hostname: String,
    pub namespace: String,
    /// Creation time (seconds), then name: the order of claims.
    pub created: i64,
}

impl Claim {
    /// Reads a record; `Err` says why it is ignored (written by hand, or
    /// its name and address disagree).
    pub fn parse(obj: &AppAddress) -> Result<Self, String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let vip: IpAddr =
            obj.spec.address.parse().map_err(|_| format!("AppAddress {name}: '{}' is not an IP address", obj.spec.address))?;
        if object_name(vip) != name {
            return Err(format!("AppAddress {name}: its name is not its address {vip}"));
        }
        Ok(Self {
            name,
            vip,
            hostname: obj.spec.hostname.clone(),
            namespace: obj.spec.namespace.clone(),
            created: obj.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
        })
    }

    pub fn order(&self) -> (i64, &str) {
        (self.created, &self.name)
    }
}

/// A new record for `vip`.
pub fn new_record(vip: IpAddr, hostname: &str, namespace: &str) -> AppAddress {
    let mut obj = AppAddress::new(
        &object_name(vip),
        AppAddressSpec { address: vip.to_string(), hostname: hostname.into(), namespace: namespace.into() },
    );
    obj.metadata.labels = Some([("app.kubernetes.io/managed-by".to_string(), "serviceless-allocator".to_string())].into());
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt as _;

    #[test]
    fn names_are_valid_object_names_and_checked_against_the_address() {
        assert_eq!(object_name("10.96.0.7".parse().unwrap()), "10.96.0.7");
        assert_eq!(object_name("fd00:96::1".parse().unwrap()), "fd00-0096-0000-0000-0000-0000-0000-0001");
        let good = new_record("10.96.0.7".parse().unwrap(), "a.example.com", "team-a");
        assert_eq!(Claim::parse(&good).unwrap().vip.to_string(), "10.96.0.7");
        let mut forged = good.clone();
        forged.spec.address = "10.96.0.8".into();
        assert!(Claim::parse(&forged).unwrap_err().contains("not its address"));
    }

    /// deploy/crd.yaml is this type's CRD: regenerate it with
    /// `cargo test -p serviceless-agent crd -- --ignored` after changing the type.
    #[test]
    fn deploy_crd_matches_the_type() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd.yaml");
        let on_disk: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).expect("deploy/crd.yaml")).expect("yaml");
        assert_eq!(on_disk, serde_json::to_value(AppAddress::crd()).unwrap(), "deploy/crd.yaml is stale");
    }

    #[test]
    #[ignore = "writes deploy/crd.yaml"]
    fn write_deploy_crd() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd.yaml");
        let yaml = serde_yaml::to_string(&AppAddress::crd()).unwrap();
        std::fs::write(path, format!("# Generated from agent/src/app_address.rs (see its tests).\n{yaml}")).unwrap();
    }
}
