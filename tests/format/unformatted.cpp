// Deliberately not clang-format clean: format.detects_unformatted checks that scripts/check_format.sh fails on it.
int   f( int x ){return x+1;}
