// The FHIR API read by fhir-kit-client, a FHIR client nobody here wrote: the
// CapabilityStatement, a patient search by NHS number, a read, one type's search paged by
// the client following `next` links, $everything and $summary. Run by tests/fhir_api.rs with the
// node's FHIR base URL, an access token and a patient's NHS number; it exits 1 on the first
// difference, saying what it was.
import assert from 'node:assert/strict';
import { Client } from 'fhir-kit-client';

const [baseUrl, token, nhs] = process.argv.slice(2);
if (!baseUrl || !token || !nhs) {
  console.error('usage: node fhir-kit-client.test.mjs FHIR_BASE_URL TOKEN NHS_NUMBER');
  process.exit(2);
}
const client = new Client({ baseUrl, bearerToken: token });

const capability = await client.capabilityStatement();
assert.equal(capability.resourceType, 'CapabilityStatement');
assert.equal(capability.fhirVersion, '4.0.1');

const found = await client.search({
  resourceType: 'Patient',
  searchParams: { identifier: `https://fhir.nhs.uk/Id/nhs-number|${nhs}` },
});
assert.equal(found.resourceType, 'Bundle');
assert.equal(found.total, 1);
assert.equal(found.entry[0].resource.id, nhs);

const patient = await client.read({ resourceType: 'Patient', id: nhs });
assert.equal(patient.resourceType, 'Patient');
assert.equal(patient.id, nhs);

// One type, a page of two at a time, newest first, followed to the end.
let page = await client.search({
  resourceType: 'Observation',
  searchParams: { patient: nhs, _count: 2, _sort: '-date' },
});
const total = page.total;
const seen = [];
let pages = 0;
while (page) {
  pages += 1;
  assert.ok(pages <= 50, 'paging does not end');
  for (const entry of page.entry ?? []) {
    if (entry.search?.mode === 'match') {
      assert.equal(entry.resource.resourceType, 'Observation');
      seen.push(entry.resource);
    }
  }
  page = await client.nextPage({ bundle: page });
}
assert.equal(seen.length, total, 'every match, once, across the pages');
assert.equal(new Set(seen.map((o) => o.id)).size, total, 'no match twice');
const dates = seen.map((o) => o.effectiveDateTime);
assert.deepEqual(dates, [...dates].sort().reverse(), 'newest first');

const everything = await client.operation({
  name: '$everything',
  resourceType: 'Patient',
  id: nhs,
  method: 'GET',
});
assert.equal(everything.resourceType, 'Bundle');
assert.equal(everything.type, 'searchset');
const types = new Set(everything.entry.map((e) => e.resource.resourceType));
for (const expected of ['Patient', 'Observation', 'Provenance']) {
  assert.ok(types.has(expected), `${expected} in $everything: ${[...types]}`);
}
for (const entry of everything.entry) {
  const { resource } = entry;
  if (resource.resourceType !== 'OperationOutcome') {
    assert.equal(entry.fullUrl, `${baseUrl}/${resource.resourceType}/${resource.id}`);
  }
}

const summary = await client.operation({
  name: '$summary',
  resourceType: 'Patient',
  id: nhs,
  method: 'GET',
});
assert.equal(summary.type, 'document');
assert.equal(summary.entry[0].resource.resourceType, 'Composition');
const sectionCodes = summary.entry[0].resource.section
  .map((s) => s.code?.coding?.[0]?.code)
  .filter(Boolean);
for (const required of ['48765-2', '10160-0', '11450-4']) {
  assert.ok(sectionCodes.includes(required), `IPS section ${required} in ${sectionCodes}`);
}

// No token: refused, with an OperationOutcome the client hands back as the error.
const anonymous = new Client({ baseUrl });
await assert.rejects(
  anonymous.read({ resourceType: 'Patient', id: nhs }),
  (error) => error.response?.status === 401 && error.response?.data?.resourceType === 'OperationOutcome',
);

console.log(JSON.stringify({ pages, observations: total, everything: everything.entry.length }));
