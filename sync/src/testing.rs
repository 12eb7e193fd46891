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
    Item::titled(
        id,
        Section::Allergies,
        DataClass::Coded,
        "AllergyIntolerance",
        title,
        "test",
        id,
    )
}
