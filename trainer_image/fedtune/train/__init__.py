"""Training one party's share: datasets and their token cache (`data`, `tokencache`), the Trainer loop
with its round hook (`loop`), and a party's data-parallel ranks (`ranks`).

May import: `fedtune.model`, `fedtune.spec` and the foundations. Knows nothing of the federation: the
loop calls back into whoever drives the rounds."""
