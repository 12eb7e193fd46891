//! Builders shared by this crate's unit tests.

use crate::model::{DataClass, DocMeta, Item, NhsNumber, OdsCode, Section};

pub fn meta_for(publisher: &str, patient: &str, section: Section, class: DataClass) -> DocMeta {
    DocMeta {
        publisher: OdsCode::parse(publisher).unwrap(),
        patient: NhsNumber::parse(patient).unwrap(),
        section,
        class,
    }
}

/// An allergy item with the given id and title.
pub fn allergy(id: &str, title: &str) -> Item {
    Item {
        id: id.into(),
        section: Section::Allergies,
        class: DataClass::Coded,
        resource_type: "AllergyIntolerance".into(),
        title: title.into(),
        code: None,
        detail: None,
        status: None,
        effective: None,
        recorded: None,
        last_updated: None,
        source_system: "test".into(),
        source_id: id.into(),
        confidentiality: None,
        fields: Default::default(),
    }
}
