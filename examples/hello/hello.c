#include <stdio.h>

int main(void) {
    printf("Hello from kiln!\n");
    return 0;
}
