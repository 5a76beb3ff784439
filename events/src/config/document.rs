//! The declarative configuration document (`stone apply -f stone.yaml`, `stone config export`,
//! `POST /v1/config/apply`) and the plan that turns a current state into a desired one.
//!
//! API keys are not declarative: they are created and revoked through their own endpoints (the key
//! is shown once), so a document never carries them and a plan keeps every consumer's current
//! keys. That is what makes "export, then apply" a no-op and keeps revoked keys revoked on revert.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{FieldError, ProposedChange};
use super::{ConfigState, ConsumerSpec, EntityKind, EntitySpec, PolicySpec, RouteSpec, UpstreamSpec};

/// A whole configuration, as written in `stone.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    #[serde(default)]
    pub upstreams: Vec<UpstreamSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub consumers: Vec<ConsumerSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
}

impl ConfigDocument {
    /// The document of a set of entities, sorted by name, without API keys.
    pub fn from_specs<'a>(specs: impl IntoIterator<Item = &'a EntitySpec>) -> Self {
        let mut document = Self::default();
        for spec in specs {
            match spec.clone() {
                EntitySpec::Upstream(upstream) => document.upstreams.push(upstream),
                EntitySpec::Route(route) => document.routes.push(route),
                EntitySpec::Consumer(consumer) => {
                    document.consumers.push(ConsumerSpec { api_keys: Vec::new(), ..consumer })
                }
                EntitySpec::Policy(policy) => document.policies.push(policy),
            }
        }
        document.upstreams.sort_by(|a, b| a.name.cmp(&b.name));
        document.routes.sort_by(|a, b| a.name.cmp(&b.name));
        document.consumers.sort_by(|a, b| a.name.cmp(&b.name));
        document.policies.sort_by(|a, b| a.name.cmp(&b.name));
        document
    }

    /// The applied configuration of a state.
    pub fn from_state(state: &ConfigState) -> Self {
        Self::from_specs(state.entities().map(|entity| &entity.spec))
    }

    /// Every entity of the document, refusing two of one kind with the same name.
    pub fn specs(&self) -> Result<Vec<EntitySpec>, FieldError> {
        let specs: Vec<EntitySpec> = self
            .upstreams
            .iter()
            .cloned()
            .map(EntitySpec::Upstream)
            .chain(self.routes.iter().cloned().map(EntitySpec::Route))
            .chain(self.consumers.iter().cloned().map(EntitySpec::Consumer))
            .chain(self.policies.iter().cloned().map(EntitySpec::Policy))
            .collect();
        let mut seen = BTreeSet::new();
        let mut index_in_kind: BTreeMap<EntityKind, usize> = BTreeMap::new();
        for spec in &specs {
            let index = index_in_kind.entry(spec.kind()).or_default();
            if !seen.insert((spec.kind(), spec.name().to_owned())) {
                return Err(FieldError::new(
                    format!("{}[{index}].name", spec.kind().plural()),
                    format!("{:?} is defined twice", spec.name()),
                ));
            }
            *index += 1;
        }
        Ok(specs)
    }
}

/// What a plan does to one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlannedOp {
    Create,
    Update,
    Delete,
}

/// One step of a plan, with the before and after states for showing a diff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedChange {
    pub op: PlannedOp,
    pub kind: EntityKind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<EntitySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<EntitySpec>,
}

impl PlannedChange {
    pub fn proposed(&self) -> ProposedChange {
        match &self.after {
            Some(spec) => ProposedChange::upsert(spec.clone()),
            None => ProposedChange::Delete { kind: self.kind, name: self.name.clone() },
        }
    }
}

/// The changes that turn `state` into `desired`. With `prune`, entities missing from `desired`
/// are deleted; without it they are left alone. Consumers keep their current API keys.
pub fn plan(state: &ConfigState, desired: &ConfigDocument, prune: bool) -> Result<Vec<PlannedChange>, FieldError> {
    let desired_specs = desired.specs()?;
    let mut changes = Vec::new();
    let mut wanted = BTreeSet::new();
    for spec in desired_specs {
        let kind = spec.kind();
        let name = spec.name().to_owned();
        wanted.insert((kind, name.clone()));
        let current = state.get(kind, &name).map(|entity| entity.spec.clone());
        let spec = match (spec, &current) {
            (EntitySpec::Consumer(consumer), Some(EntitySpec::Consumer(existing))) => {
                EntitySpec::Consumer(ConsumerSpec { api_keys: existing.api_keys.clone(), ..consumer })
            }
            (EntitySpec::Consumer(consumer), _) => {
                EntitySpec::Consumer(ConsumerSpec { api_keys: Vec::new(), ..consumer })
            }
            (other, _) => other,
        };
        match current {
            None => changes.push(PlannedChange { op: PlannedOp::Create, kind, name, before: None, after: Some(spec) }),
            Some(before) if before != spec => changes.push(PlannedChange {
                op: PlannedOp::Update,
                kind,
                name,
                before: Some(before),
                after: Some(spec),
            }),
            Some(_) => {}
        }
    }
    if prune {
        for entity in state.entities() {
            let key = (entity.spec.kind(), entity.spec.name().to_owned());
            if !wanted.contains(&key) {
                changes.push(PlannedChange {
                    op: PlannedOp::Delete,
                    kind: key.0,
                    name: key.1,
                    before: Some(entity.spec.clone()),
                    after: None,
                });
            }
        }
    }
    Ok(changes)
}
