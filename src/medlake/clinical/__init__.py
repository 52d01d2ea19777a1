"""Clinical data services: FHIR resources, HL7 v2 messages and the links between them."""
