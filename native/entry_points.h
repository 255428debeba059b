/*
 * The one table of PKCS#11 2.40 entry points.
 *
 * SERVED(name, params, args): implemented in Python (provider/entry.py) and
 * reached through a cffi callback named p11grid_py_<name>.
 * REFUSED(name, params, rv): answered in C with a fixed CK_RV once the module
 * is initialized (the token never offers these operations).
 *
 * C_Initialize and C_GetFunctionList are written by hand in p11grid.c.
 */
#ifndef P11GRID_ENTRY_POINTS_H
#define P11GRID_ENTRY_POINTS_H

#define P11GRID_ENTRY_POINTS(SERVED, REFUSED) \
  SERVED(C_Finalize, (CK_VOID_PTR pReserved), (pReserved)) \
  SERVED(C_GetInfo, (CK_INFO_PTR pInfo), (pInfo)) \
  P11GRID_ENTRY_POINTS_AFTER_GETINFO(SERVED, REFUSED)

/* In CK_FUNCTION_LIST order, C_GetFunctionList sits between these two parts. */
#define P11GRID_ENTRY_POINTS_AFTER_GETINFO(SERVED, REFUSED) \
  SERVED(C_GetSlotList, (CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount), \
         (tokenPresent, pSlotList, pulCount)) \
  SERVED(C_GetSlotInfo, (CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo), (slotID, pInfo)) \
  SERVED(C_GetTokenInfo, (CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo), (slotID, pInfo)) \
  SERVED(C_GetMechanismList, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, \
         CK_ULONG_PTR pulCount), (slotID, pMechanismList, pulCount)) \
  SERVED(C_GetMechanismInfo, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, \
         CK_MECHANISM_INFO_PTR pInfo), (slotID, type, pInfo)) \
  REFUSED(C_InitToken, (CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, \
          CK_UTF8CHAR_PTR pLabel), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_InitPIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_SetPIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen, \
          CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_OpenSession, (CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, \
         CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession), \
         (slotID, flags, pApplication, Notify, phSession)) \
  SERVED(C_CloseSession, (CK_SESSION_HANDLE hSession), (hSession)) \
  SERVED(C_CloseAllSessions, (CK_SLOT_ID slotID), (slotID)) \
  SERVED(C_GetSessionInfo, (CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo), \
         (hSession, pInfo)) \
  REFUSED(C_GetOperationState, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, \
          CK_ULONG_PTR pulOperationStateLen), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_SetOperationState, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, \
          CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE hEncryptionKey, \
          CK_OBJECT_HANDLE hAuthenticationKey), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_Login, (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, \
         CK_ULONG ulPinLen), (hSession, userType, pPin, ulPinLen)) \
  SERVED(C_Logout, (CK_SESSION_HANDLE hSession), (hSession)) \
  REFUSED(C_CreateObject, (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, \
          CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_CopyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phNewObject), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_DestroyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_GetObjectSize, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
          CK_ULONG_PTR pulSize), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_GetAttributeValue, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
         CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount), (hSession, hObject, pTemplate, ulCount)) \
  REFUSED(C_SetAttributeValue, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_FindObjectsInit, (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, \
         CK_ULONG ulCount), (hSession, pTemplate, ulCount)) \
  SERVED(C_FindObjects, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, \
         CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount), \
         (hSession, phObject, ulMaxObjectCount, pulObjectCount)) \
  SERVED(C_FindObjectsFinal, (CK_SESSION_HANDLE hSession), (hSession)) \
  REFUSED(C_EncryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_OBJECT_HANDLE hKey), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_Encrypt, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
          CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_EncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, \
          CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_EncryptFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart, \
          CK_ULONG_PTR pulLastEncryptedPartLen), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_DecryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
         CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  SERVED(C_Decrypt, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData, \
         CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen), \
         (hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen)) \
  REFUSED(C_DecryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
          CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_DecryptFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart, \
          CK_ULONG_PTR pulLastPartLen), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_DigestInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism), \
         (hSession, pMechanism)) \
  SERVED(C_Digest, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
         CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen), \
         (hSession, pData, ulDataLen, pDigest, pulDigestLen)) \
  SERVED(C_DigestUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen), \
         (hSession, pPart, ulPartLen)) \
  REFUSED(C_DigestKey, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_DigestFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, \
         CK_ULONG_PTR pulDigestLen), (hSession, pDigest, pulDigestLen)) \
  SERVED(C_SignInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
         CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  SERVED(C_Sign, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
         CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen), \
         (hSession, pData, ulDataLen, pSignature, pulSignatureLen)) \
  SERVED(C_SignUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen), \
         (hSession, pPart, ulPartLen)) \
  SERVED(C_SignFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, \
         CK_ULONG_PTR pulSignatureLen), (hSession, pSignature, pulSignatureLen)) \
  REFUSED(C_SignRecoverInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_OBJECT_HANDLE hKey), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_SignRecover, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
          CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen), CKR_FUNCTION_NOT_SUPPORTED) \
  SERVED(C_VerifyInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
         CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  SERVED(C_Verify, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
         CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen), \
         (hSession, pData, ulDataLen, pSignature, ulSignatureLen)) \
  SERVED(C_VerifyUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen), \
         (hSession, pPart, ulPartLen)) \
  SERVED(C_VerifyFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, \
         CK_ULONG ulSignatureLen), (hSession, pSignature, ulSignatureLen)) \
  REFUSED(C_VerifyRecoverInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_OBJECT_HANDLE hKey), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_VerifyRecover, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, \
          CK_ULONG ulSignatureLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_DigestEncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, \
          CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_DecryptDigestUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
          CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_SignEncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, \
          CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
          CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_GenerateKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phKey), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_GenerateKeyPair, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_ATTRIBUTE_PTR pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount, \
          CK_ATTRIBUTE_PTR pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount, \
          CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_WrapKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey, CK_BYTE_PTR pWrappedKey, \
          CK_ULONG_PTR pulWrappedKeyLen), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_UnwrapKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey, CK_ULONG ulWrappedKeyLen, \
          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey), \
          CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_DeriveKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
          CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, \
          CK_OBJECT_HANDLE_PTR phKey), CKR_FUNCTION_NOT_SUPPORTED) \
  REFUSED(C_SeedRandom, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen), \
          CKR_RANDOM_SEED_NOT_SUPPORTED) \
  SERVED(C_GenerateRandom, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, \
         CK_ULONG ulRandomLen), (hSession, RandomData, ulRandomLen)) \
  REFUSED(C_GetFunctionStatus, (CK_SESSION_HANDLE hSession), CKR_FUNCTION_NOT_PARALLEL) \
  REFUSED(C_CancelFunction, (CK_SESSION_HANDLE hSession), CKR_FUNCTION_NOT_PARALLEL) \
  REFUSED(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved), \
          CKR_FUNCTION_NOT_SUPPORTED)

/* PKCS#11 3.0 additions after C_GetInterfaceList/C_GetInterface, in struct order. */
#define P11GRID_ENTRY_POINTS_3_0(REFUSED3) \
  REFUSED3(C_LoginUser, (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, \
           CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pUsername, CK_ULONG ulUsernameLen)) \
  REFUSED3(C_SessionCancel, (CK_SESSION_HANDLE hSession, CK_FLAGS flags)) \
  REFUSED3(C_MessageEncryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
           CK_OBJECT_HANDLE hKey)) \
  REFUSED3(C_EncryptMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen, \
           CK_BYTE_PTR pPlaintext, CK_ULONG ulPlaintextLen, CK_BYTE_PTR pCiphertext, \
           CK_ULONG_PTR pulCiphertextLen)) \
  REFUSED3(C_EncryptMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen)) \
  REFUSED3(C_EncryptMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pPlaintextPart, CK_ULONG ulPlaintextPartLen, \
           CK_BYTE_PTR pCiphertextPart, CK_ULONG_PTR pulCiphertextPartLen, CK_FLAGS flags)) \
  REFUSED3(C_MessageEncryptFinal, (CK_SESSION_HANDLE hSession)) \
  REFUSED3(C_MessageDecryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
           CK_OBJECT_HANDLE hKey)) \
  REFUSED3(C_DecryptMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen, \
           CK_BYTE_PTR pCiphertext, CK_ULONG ulCiphertextLen, CK_BYTE_PTR pPlaintext, \
           CK_ULONG_PTR pulPlaintextLen)) \
  REFUSED3(C_DecryptMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen)) \
  REFUSED3(C_DecryptMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pCiphertextPart, CK_ULONG ulCiphertextPartLen, \
           CK_BYTE_PTR pPlaintextPart, CK_ULONG_PTR pulPlaintextPartLen, CK_FLAGS flags)) \
  REFUSED3(C_MessageDecryptFinal, (CK_SESSION_HANDLE hSession)) \
  REFUSED3(C_MessageSignInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
           CK_OBJECT_HANDLE hKey)) \
  REFUSED3(C_SignMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
           CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)) \
  REFUSED3(C_SignMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen)) \
  REFUSED3(C_SignMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
           CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)) \
  REFUSED3(C_MessageSignFinal, (CK_SESSION_HANDLE hSession)) \
  REFUSED3(C_MessageVerifyInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
           CK_OBJECT_HANDLE hKey)) \
  REFUSED3(C_VerifyMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
           CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)) \
  REFUSED3(C_VerifyMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen)) \
  REFUSED3(C_VerifyMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
           CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
           CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)) \
  REFUSED3(C_MessageVerifyFinal, (CK_SESSION_HANDLE hSession))

#endif
