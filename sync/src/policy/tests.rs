//! One case per sharing rule, each with the rule's reason.

use super::*;
use crate::model::NhsNumber;

fn ods(code: &str) -> OdsCode {
    OdsCode::parse(code).unwrap()
}

fn gp_document(section: Section, class: DataClass) -> DocMeta {
    DocMeta {
        publisher: ods("A81001"),
        patient: NhsNumber::parse("9912003888").unwrap(),
        section,
        class,
    }
}

fn recipient(code: &str, kind: OrgKind) -> Recipient {
    Recipient {
        ods: ods(code),
        kind,
    }
}

/// The Oxfordshire rule and a hospice agreement, as configs/agreements.toml ships them.
fn oxfordshire() -> Agreements {
    Agreements {
        agreements: vec![
            Agreement {
                publisher: OrgKind::Gp,
                recipients: vec![OrgKind::Acute],
                classes: vec![DataClass::Coded],
                except_sections: vec![],
            },
            Agreement {
                publisher: OrgKind::Gp,
                recipients: vec![OrgKind::Hospice],
                classes: vec![DataClass::Coded, DataClass::FreeText, DataClass::Document],
                except_sections: vec![Section::Referrals],
            },
        ],
        region_wide: vec![OrgKind::Ambulance],
        share_from: BTreeMap::from([(ods("A81001"), "2015-01-01".to_string())]),
    }
}

const SHARING: Consent = Consent {
    share_out: true,
    share_in: true,
    objection: false,
};

fn facts(consent: Consent, cares: bool) -> Facts {
    Facts {
        publisher_kind: Some(OrgKind::Gp),
        consent,
        recipient_cares_for_patient: cares,
        direct_from_publisher: false,
    }
}

fn acute() -> Recipient {
    recipient("RTH", OrgKind::Acute)
}

#[test]
fn coded_gp_data_reaches_an_acute_trust_caring_for_the_patient() {
    let decision = decide(
        &gp_document(Section::Problems, DataClass::Coded),
        &acute(),
        &oxfordshire(),
        &facts(SHARING, true),
    );
    assert_eq!(decision, Decision::Send);
}

#[test]
fn acute_trusts_get_no_gp_free_text_or_documents() {
    for class in [DataClass::FreeText, DataClass::Document] {
        let decision = decide(
            &gp_document(Section::Encounters, class),
            &acute(),
            &oxfordshire(),
            &facts(SHARING, true),
        );
        assert_eq!(
            decision,
            Decision::Withhold(WithholdReason::NotAgreed {
                class,
                section: Section::Encounters
            })
        );
    }
}

#[test]
fn an_agreement_can_leave_a_section_out() {
    let hospice = recipient("8HA15", OrgKind::Hospice);
    let agreements = oxfordshire();
    let meta = gp_document(Section::Referrals, DataClass::Coded);
    assert_eq!(
        decide(&meta, &hospice, &agreements, &facts(SHARING, true)),
        Decision::Withhold(WithholdReason::NotAgreed {
            class: DataClass::Coded,
            section: Section::Referrals
        })
    );
    let notes = gp_document(Section::Encounters, DataClass::FreeText);
    assert_eq!(
        decide(&notes, &hospice, &agreements, &facts(SHARING, true)),
        Decision::Send
    );
}

#[test]
fn private_items_never_leave_even_for_hubs() {
    let meta = gp_document(Section::Problems, DataClass::Private);
    for to in [acute(), recipient("HUB01", OrgKind::Hub)] {
        assert_eq!(
            decide(&meta, &to, &oxfordshire(), &facts(SHARING, true)),
            Decision::Withhold(WithholdReason::Private)
        );
    }
    let itself = recipient("A81001", OrgKind::Gp);
    assert_eq!(
        decide(&meta, &itself, &oxfordshire(), &facts(SHARING, true)),
        Decision::Send
    );
}

#[test]
fn sensitive_items_are_withheld_unless_an_agreement_names_them() {
    let meta = gp_document(Section::Problems, DataClass::Sensitive);
    let hub = recipient("HUB01", OrgKind::Hub);
    let mut agreements = oxfordshire();
    for to in [&acute(), &hub] {
        assert_eq!(
            decide(&meta, to, &agreements, &facts(SHARING, true)),
            Decision::Withhold(WithholdReason::Sensitive)
        );
    }
    agreements.agreements[1].classes.push(DataClass::Sensitive);
    let hospice = recipient("8HA15", OrgKind::Hospice);
    assert_eq!(
        decide(&meta, &hospice, &agreements, &facts(SHARING, true)),
        Decision::Send
    );
    // The hub may now hold it to relay, but still not pass it to the acute trust.
    assert_eq!(
        decide(&meta, &hub, &agreements, &facts(SHARING, true)),
        Decision::Send
    );
    assert_eq!(
        decide(&meta, &acute(), &agreements, &facts(SHARING, true)),
        Decision::Withhold(WithholdReason::Sensitive)
    );
}

#[test]
fn share_out_off_and_objection_withhold_everything_even_from_hubs() {
    let meta = gp_document(Section::Allergies, DataClass::Coded);
    let hub = recipient("HUB01", OrgKind::Hub);
    let off = Consent {
        share_out: false,
        ..SHARING
    };
    let objecting = Consent {
        objection: true,
        ..SHARING
    };
    for to in [&acute(), &hub] {
        assert_eq!(
            decide(&meta, to, &oxfordshire(), &facts(off, true)),
            Decision::Withhold(WithholdReason::ShareOutOff)
        );
        assert_eq!(
            decide(&meta, to, &oxfordshire(), &facts(objecting, true)),
            Decision::Withhold(WithholdReason::Objection)
        );
    }
}

#[test]
fn the_sharing_record_reaches_whoever_holds_the_patient_even_after_withdrawal() {
    let meta = gp_document(Section::Sharing, DataClass::Coded);
    let withdrawn = Consent {
        share_out: false,
        objection: true,
        ..SHARING
    };
    assert_eq!(
        decide(&meta, &acute(), &oxfordshire(), &facts(withdrawn, true)),
        Decision::Send
    );
    assert_eq!(
        decide(&meta, &acute(), &oxfordshire(), &facts(withdrawn, false)),
        Decision::Withhold(WithholdReason::NotInCaseload)
    );
    // A publisher tells its direct peers whom it cares for, so they can send it theirs.
    let direct = Facts {
        direct_from_publisher: true,
        ..facts(SHARING, false)
    };
    assert_eq!(
        decide(&meta, &acute(), &oxfordshire(), &direct),
        Decision::Send
    );
    // That never extends to clinical documents.
    let problems = gp_document(Section::Problems, DataClass::Coded);
    assert_eq!(
        decide(&problems, &acute(), &oxfordshire(), &direct),
        Decision::Withhold(WithholdReason::NotInCaseload)
    );
}

#[test]
fn access_records_reach_the_caseload_whatever_the_consent_or_agreements() {
    let meta = gp_document(Section::Audit, DataClass::Coded);
    let withdrawn = Consent {
        share_out: false,
        objection: true,
        ..SHARING
    };
    let no_agreements = Agreements::default();
    assert_eq!(
        decide(&meta, &acute(), &no_agreements, &facts(withdrawn, true)),
        Decision::Send,
        "who saw the record must reach those who care for the patient"
    );
    assert_eq!(
        decide(&meta, &acute(), &oxfordshire(), &facts(SHARING, false)),
        Decision::Withhold(WithholdReason::NotInCaseload),
        "nor anyone else"
    );
    let hub = recipient("HUB01", OrgKind::Hub);
    assert_eq!(
        decide(&meta, &hub, &oxfordshire(), &facts(SHARING, false)),
        Decision::Send
    );
    let private = gp_document(Section::Audit, DataClass::Private);
    assert_eq!(
        decide(&private, &hub, &oxfordshire(), &facts(SHARING, true)),
        Decision::Withhold(WithholdReason::Private)
    );
}

#[test]
fn nodes_hold_their_caseload_unless_the_region_says_region_wide() {
    let meta = gp_document(Section::Problems, DataClass::Coded);
    assert_eq!(
        decide(&meta, &acute(), &oxfordshire(), &facts(SHARING, false)),
        Decision::Withhold(WithholdReason::NotInCaseload)
    );
    let mut agreements = oxfordshire();
    agreements.agreements[0].recipients.push(OrgKind::Ambulance);
    let ambulance = recipient("RYE", OrgKind::Ambulance);
    assert_eq!(
        decide(&meta, &ambulance, &agreements, &facts(SHARING, false)),
        Decision::Send
    );
}

#[test]
fn no_agreement_and_unknown_publishers_are_denied() {
    let meta = gp_document(Section::Problems, DataClass::Coded);
    let social_care = recipient("SC001", OrgKind::SocialCare);
    assert_eq!(
        decide(&meta, &social_care, &oxfordshire(), &facts(SHARING, true)),
        Decision::Withhold(WithholdReason::NoAgreement {
            publisher: OrgKind::Gp,
            recipient: OrgKind::SocialCare
        })
    );
    let unknown = Facts {
        publisher_kind: None,
        ..facts(SHARING, true)
    };
    assert_eq!(
        decide(&meta, &acute(), &oxfordshire(), &unknown),
        Decision::Withhold(WithholdReason::UnknownPublisher)
    );
}

#[test]
fn share_from_keeps_older_and_undated_items_at_the_publisher() {
    let agreements = oxfordshire();
    let gp = ods("A81001");
    assert!(agreements.shareable_date(&gp, Some("2015-01-01")));
    assert!(agreements.shareable_date(&gp, Some("2020-06-30T10:00:00Z")));
    assert!(!agreements.shareable_date(&gp, Some("2014-12-31")));
    assert!(!agreements.shareable_date(&gp, None));
    assert!(agreements.shareable_date(&ods("RTH"), None));
}

#[test]
fn agreements_that_could_never_be_meant_are_refused() {
    let mut private = oxfordshire();
    private.agreements[0].classes.push(DataClass::Private);
    assert_eq!(private.validate(), Err(AgreementError::PrivateShared));
    let mut hub = oxfordshire();
    hub.agreements[0].recipients.push(OrgKind::Hub);
    assert_eq!(hub.validate(), Err(AgreementError::HubAgreement));
    let mut date = oxfordshire();
    date.share_from.insert(ods("RTH"), "1/1/2015".into());
    assert!(matches!(
        date.validate(),
        Err(AgreementError::ShareFromDate(_, _))
    ));
    assert_eq!(oxfordshire().validate(), Ok(()));
}

#[test]
fn viewers_see_others_data_only_with_share_in_or_break_glass() {
    let gp = ods("A81001");
    let acute = ods("RTH");
    let no_share_in = Consent {
        share_in: false,
        ..SHARING
    };
    assert_eq!(
        decide_view(&gp, &acute, &SHARING, false),
        ViewDecision::ShareIn
    );
    assert_eq!(
        decide_view(&gp, &acute, &no_share_in, false),
        ViewDecision::NoShareIn
    );
    assert_eq!(
        decide_view(&gp, &acute, &no_share_in, true),
        ViewDecision::BreakGlass
    );
    assert_eq!(
        decide_view(&acute, &acute, &no_share_in, false),
        ViewDecision::Own
    );
}

#[test]
fn consent_round_trips_through_the_sharing_record_fields() {
    let consent = Consent {
        share_out: false,
        share_in: true,
        objection: true,
    };
    assert_eq!(Consent::from_fields(&consent.to_fields()), Some(consent));
    let mut damaged = consent.to_fields();
    damaged.insert("objection".into(), "maybe".into());
    assert_eq!(Consent::from_fields(&damaged), None);
    damaged.remove("objection");
    assert_eq!(Consent::from_fields(&damaged), None);
}

#[test]
fn a_sharing_record_carries_counts_per_section_except_after_an_objection() {
    let counts = BTreeMap::from([(Section::Problems, 4), (Section::Results, 12)]);
    let sharing = SharingRecord::new(Consent::SENT_BY_PUBLISHER, counts.clone());
    let fields = sharing.to_fields();
    assert_eq!(fields["items.problems"], "4");
    assert_eq!(SharingRecord::from_fields(&fields), Some(sharing));
    let objecting = Consent {
        objection: true,
        ..Consent::SENT_BY_PUBLISHER
    };
    let withheld = SharingRecord::new(objecting, counts.clone());
    assert!(withheld.items_per_section.is_empty());
    assert!(!withheld.to_fields().keys().any(|k| k.starts_with("items.")));
    // The publisher's feed travels with it, bounded on the way in.
    let stated =
        SharingRecord::new(Consent::SENT_BY_PUBLISHER, counts).with_source(Some(SourceStatement {
            feed: "batch".into(),
            system: "EMIS Web".into(),
            refresh_hours: Some(12),
        }));
    let fields = stated.to_fields();
    assert_eq!(SharingRecord::from_fields(&fields), Some(stated));
    let mut implausible = fields.clone();
    implausible.insert("source.feed".into(), "x".repeat(100));
    assert_eq!(
        SharingRecord::from_fields(&implausible).unwrap().source,
        None
    );
}

#[test]
fn deciding_without_facts_agrees_with_deciding_with_them() {
    let agreements = oxfordshire();
    let consents = [
        SHARING,
        Consent::SENT_BY_PUBLISHER,
        Consent {
            share_out: false,
            share_in: true,
            objection: false,
        },
        Consent {
            share_out: true,
            share_in: false,
            objection: true,
        },
    ];
    let mut checked = 0;
    for &section in Section::ALL {
        for &class in DataClass::ALL {
            let meta = gp_document(section, class);
            for &kind in OrgKind::ALL {
                for code in ["A81001", "RTH"] {
                    let to = recipient(code, kind);
                    for (cares, direct) in [(false, false), (false, true), (true, false)] {
                        let Some(early) =
                            decided_without_facts(&meta, &to, &agreements, cares, direct)
                        else {
                            continue;
                        };
                        for consent in consents {
                            let mut facts = facts(consent, cares);
                            facts.direct_from_publisher = direct;
                            let full = decide(&meta, &to, &agreements, &facts);
                            assert_eq!(
                                early == Decision::Send,
                                full == Decision::Send,
                                "{section:?} {class:?} to {kind:?} {code} cares {cares} direct {direct}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(
        checked > 100,
        "the shortcut applied to {checked} cases only"
    );
    // And it applies to the common case: a GP's coded data for another GP off the caseload.
    assert_eq!(
        decided_without_facts(
            &gp_document(Section::Problems, DataClass::Coded),
            &recipient("B82001", OrgKind::Gp),
            &agreements,
            false,
            false
        ),
        Some(Decision::Withhold(WithholdReason::NotInCaseload))
    );
}
