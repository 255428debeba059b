"""PKCS#11 semantics in Python: slots, tokens, sessions, objects, operations, CK_RV mapping."""
